r"""Beta moving average of model weights (CLIPood; docs/contract.md section 6).

Weights w_t = Beta(β, β).pdf((t + 0.5) / (T + 1)) for t = 0..T. The average starts at θ_0 with
weight w_0; after optimizer step t, with r = w_t / Σ_{k<t} w_k:

    θ_bma ← (θ_bma + r θ_t) / (1 + r)  =  lerp(θ_bma, θ_t, r / (1 + r))

so θ_bma is always the w-weighted mean of θ_0..θ_t. The update is one `torch._foreach_lerp_`
over every floating parameter and buffer: one fused multi-tensor launch per dtype group, never a
Python loop of small kernels. Non-floating buffers (counters) are copied.
"""
import copy
import math

import torch


def beta_weight(t, total_steps, beta):
    """Beta(β, β) density at (t + 0.5) / (T + 1), from log-gamma (no scipy)."""
    x = (t + 0.5) / (total_steps + 1)
    log_norm = math.lgamma(2 * beta) - 2 * math.lgamma(beta)
    return math.exp(log_norm + (beta - 1) * (math.log(x) + math.log1p(-x)))


class BetaMovingAverage:
    """`bma = BetaMovingAverage(model, total_steps, beta=0.5)`; `bma.update()` after each step.

    `bma.module` is the averaged copy (eval mode, no gradients). `state_dict()` carries the
    averaged weights, the weight sum and the step, so a resumed run continues exactly.
    """

    def __init__(self, model, total_steps, beta=0.5):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be finite and > 0, got {beta!r}")
        self.model = model
        self.total_steps = total_steps
        self.beta = float(beta)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.step = 0
        self.weight_sum = beta_weight(0, total_steps, self.beta)
        self._pairs = self._tensor_pairs()

    def _tensor_pairs(self):
        src = dict(self.model.named_parameters())
        src.update(self.model.named_buffers())
        dst = dict(self.module.named_parameters())
        dst.update(self.module.named_buffers())
        if src.keys() != dst.keys():
            raise ValueError("the averaged module no longer matches the model's parameters")
        groups, copies = {}, []
        for name, t in src.items():
            if t.is_floating_point():
                groups.setdefault((t.device, t.dtype), ([], []))
                groups[(t.device, t.dtype)][0].append(dst[name])
                groups[(t.device, t.dtype)][1].append(t.detach())   # shares storage: stays current
            else:
                copies.append((dst[name], t))
        return list(groups.values()), copies

    @torch.no_grad()
    def update(self):
        """Fold the model's current weights in as step t = self.step + 1."""
        if self.step >= self.total_steps:
            raise RuntimeError(f"BMA already holds all {self.total_steps} steps")
        self.step += 1
        w = beta_weight(self.step, self.total_steps, self.beta)
        ratio = w / self.weight_sum
        self.weight_sum += w
        groups, copies = self._pairs
        for averaged, current in groups:
            torch._foreach_lerp_(averaged, current, ratio / (1.0 + ratio))
        for averaged, current in copies:
            averaged.copy_(current)

    def state_dict(self):
        return {"module": self.module.state_dict(), "step": self.step,
                "weight_sum": self.weight_sum, "total_steps": self.total_steps, "beta": self.beta}

    def load_state_dict(self, state):
        if state["total_steps"] != self.total_steps or state["beta"] != self.beta:
            raise ValueError(f"BMA state is for total_steps={state['total_steps']}, "
                             f"beta={state['beta']}; this run has total_steps={self.total_steps}, "
                             f"beta={self.beta}")
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
        self.weight_sum = float(state["weight_sum"])
