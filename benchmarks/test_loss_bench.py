"""One group per loss op (target, aal, similarity-align, sls-mms) and bma, forward + backward,
at the paper's shapes (B=108, P=196, E=512, K in {7, 65, 345}, L=5, H=12) on CUDA, reduced on the
CPU:
- `reference`: the PyTorch oracle, eager;
- `compiled`: the same oracle through `torch.compile` (its elementwise work fused into generated
  kernels): the strongest rival of equal output, warmed up, its compile time recorded apart
  (`compile_s`); on the CPU at the first class count only (each shape compiles again);
- `fused`: ours.
The report puts the work counter's model time beside each."""
import time

import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip import BetaMovingAverage
from alignclip_kernels import reference as ref
from alignclip_kernels import roofline
from conftest import CUDA, DEVICE, measure, needs_cuda

B, P, E, L, H = (108, 196, 512, 5, 12) if CUDA else (8, 196, 512, 5, 12)
KS = [7, 65, 345] if CUDA else [7, 65]
DTYPE = torch.bfloat16 if CUDA else torch.float32
ISZ = torch.empty((), dtype=DTYPE).element_size()
OPS = {"reference": ref, "compiled": None, "fused": ak}
LOSS_OPS = ("token_text_target", "aal_loss", "similarity_align_loss", "sls_mms_loss")


class Compiled:
    """The reference loss ops, each through torch.compile (one compiled function per op)."""

    def __init__(self):
        for name in LOSS_OPS:
            setattr(self, name, torch.compile(getattr(ref, name)))


_COMPILED = []


def ops_of(provider):
    if provider != "compiled":
        return OPS[provider]
    if not _COMPILED:
        _COMPILED.append(Compiled())
    return _COMPILED[0]


def _inputs(k, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens = torch.randn(B, P, E, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    tokens_dv = torch.randn(B, P, E, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    text = F.normalize(torch.randn(k, E, device=DEVICE, generator=gen), dim=-1).to(DTYPE)
    labels = torch.randint(0, k, (B,), device=DEVICE, generator=gen)
    return tokens, tokens_dv, text, labels


def _cls(seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.softmax(torch.randn(L, B, H, P + 1, device=DEVICE, generator=gen), -1).requires_grad_()


def _target_case(ops, k):
    tokens, _, text, labels = _inputs(k)
    return (lambda: ops.token_text_target(tokens, text, labels).square().sum(), [tokens],
            roofline.fwd_bwd(roofline.token_text_target, B, P, E, ISZ, k=k))


def _aal_case(ops, k):
    _, tokens_dv, text, labels = _inputs(k)
    cls = _cls()
    return (lambda: ops.aal_loss(cls, tokens_dv, text, labels), [cls, tokens_dv],
            roofline.fwd_bwd(roofline.aal, L, B, H, P + 1, E, ISZ, k=k))


def _similarity_case(ops, k):
    tokens, tokens_dv, text, _ = _inputs(k)
    return (lambda: ops.similarity_align_loss(tokens, tokens_dv, text), [tokens, tokens_dv],
            roofline.fwd_bwd(roofline.similarity_align, B, P, E, k, ISZ))


def _sls_case(ops, k):
    tokens, _, text, labels = _inputs(k)
    feats = tokens[:, 0].detach().float().requires_grad_()
    text = text.float()
    dist = ref.class_distribution(text)
    return (lambda: ops.sls_mms_loss(feats, text, labels, dist)[0], [feats],
            roofline.fwd_bwd(roofline.sls_mms, B, E, k, 4))


# group: (case builder, class counts)
CASES = {"target": _target_case, "aal": _aal_case, "similarity-align": _similarity_case,
         "sls-mms": _sls_case}


@pytest.mark.parametrize("op,k", [(op, k) for op in CASES for k in KS])
@pytest.mark.parametrize("provider", list(OPS))
def test_loss(benchmark, provider, op, k):
    """Forward + backward of one loss op: a scalar out, gradients of its floating inputs."""
    needs_cuda(provider)
    if provider == "compiled" and not CUDA and k != KS[0]:
        pytest.skip(f"on the CPU the compiled rival runs at K={KS[0]} only (each shape compiles again)")
    loss_fn, leaves, cost = CASES[op](ops_of(provider), k)
    info = {}
    if provider == "compiled":
        started = time.perf_counter()
        torch.autograd.grad(loss_fn(), leaves)
        info["compile_s"] = time.perf_counter() - started
    measure(benchmark, lambda: torch.autograd.grad(loss_fn(), leaves), group=f"{op} K={k}",
            provider=provider, cost=cost, op=op, k=k, **info)


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_bma(benchmark, provider):
    from open_clip.transformer import VisionTransformer
    from providers import bma_loop

    width, layers = (768, 12) if CUDA else (384, 6)
    model = VisionTransformer(224, 16, width, layers, width // 64, 4.0, output_dim=512).to(DEVICE)
    bma = BetaMovingAverage(model, total_steps=10 ** 6, beta=0.5)
    n_params = sum(p.numel() for p in model.parameters())
    averaged = list(bma.module.parameters())
    params = list(model.parameters())
    state = {"sum": bma.weight_sum, "step": 0}

    def loop():
        state["step"] += 1
        state["sum"] = bma_loop(averaged, params, state["step"], bma.total_steps, 0.5, state["sum"])

    measure(benchmark, loop if provider == "reference" else bma.update, group="bma", provider=provider,
            cost=roofline.bma(n_params), params=n_params, tensors=len(params))
