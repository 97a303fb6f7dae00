"""One optimizer step of the trainer, with the options every trainer has.

- `train.precision`: `auto` (bf16 autocast on CUDA, fp32 on the CPU), `bf16`, `fp16` (autocast
  with a dynamic loss scaler: a step whose scaled gradient overflows is skipped and the scale
  lowered, as torch.amp does; such a gradient is expected, so only the loss terms are then
  held to be finite) or `fp32`.
- `train.accumulate`: the step's batch (every domain's `data.batch_size` images) runs as that
  many equal micro-batches, their gradients summed before one optimizer step: the effective
  batch, the schedule, the BMA and the batch order are the unaccumulated run's; only the
  activation memory shrinks. Under DDP the gradients are reduced once, on the last micro-batch.
- `train.grad_clip`: the gradient's global L2 norm clipped to this value (after unscaling).
- `train.warmup_steps`: the learning rate rises linearly over these steps, then follows the
  cosine over the remaining ones; 0 is the authors' plain cosine over all steps.
- `train.deterministic`: `torch.use_deterministic_algorithms(True)` for the run, so the fused
  ops take their deterministic mode (no float atomics) and PyTorch its own; an op without a
  deterministic implementation then raises rather than silently varying.
"""
import contextlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import RunError


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """`torch.use_deterministic_algorithms(True)` inside (the previous setting restored after),
    with the cuBLAS workspace PyTorch then asks for, unless the environment chose one."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def autocast_dtype(precision, device):
    """The autocast dtype of a precision on a device (None: fp32, no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(precision, device):
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warmup_cosine(total, warmup):
    """The learning-rate factor of step s (the scheduler's count of steps taken)."""
    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        span = max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(s - warmup, span) / span))
    return factor


@dataclass
class StepResult:
    terms: object              # the loss terms, each the mean over the whole step batch
    grad_norm: Optional[torch.Tensor]
    scaled: bool               # fp16: an overflowing step may have been skipped by the scaler


class Stepper:
    """Forward, backward (in micro-batches), clip and one optimizer step; no host sync."""

    def __init__(self, forward, params, optimizer, scheduler, cfg, device, no_sync=None):
        self.forward, self.params, self.optimizer, self.scheduler = forward, list(params), optimizer, scheduler
        self.precision, self.device = cfg.train.precision, device
        self.accumulate, self.clip = cfg.train.accumulate, cfg.train.grad_clip
        fp16 = autocast_dtype(self.precision, device) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        self.no_sync = no_sync or contextlib.nullcontext

    def __call__(self, images, labels):
        if len(labels) % self.accumulate:
            raise RunError(f"train.accumulate {self.accumulate} must divide the step's batch of {len(labels)} images")
        self.optimizer.zero_grad(set_to_none=True)
        parts = list(zip(images.chunk(self.accumulate), labels.chunk(self.accumulate)))
        total = None
        for i, (x, y) in enumerate(parts):
            sync = contextlib.nullcontext() if i == len(parts) - 1 else self.no_sync()
            with sync:
                with autocast(self.precision, self.device):
                    terms = self.forward(x, y)
                loss = terms.total / len(parts)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = terms if total is None else _summed(total, terms)
        if len(parts) > 1:
            total = _summed(total, None, scale=1.0 / len(parts))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            with warnings.catch_warnings():   # a step the scaler skipped is expected, not a misordering
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        return StepResult(total, norm, self.scaler is not None)

    def state_dict(self):
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state):
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _summed(a, b, scale=1.0):
    """Loss terms (a NamedTuple of tensors) added field by field (logits concatenated)."""
    fields = {}
    for name in a._fields:
        x = getattr(a, name)
        if name == "logits":
            fields[name] = x if b is None else torch.cat([x, getattr(b, name)])
        else:
            fields[name] = (x if b is None else x + getattr(b, name)) * scale
    return type(a)(**fields)
