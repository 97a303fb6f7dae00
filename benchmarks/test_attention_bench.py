"""attention-fwd / attention-fwdbwd: every provider of providers.py on the same packed QKV, at
ViT-B/16 (B=108) and ViT-L/14 (B=32) in bf16 on CUDA, at a reduced ViT-B/16 shape on the CPU.
Rows record the SDPA backend PyTorch picked (`sdpa`, `sdpa-rows`) and the path the library's
choice took for the shape (`fused`)."""
import pytest
import torch
from providers import ATTENTION, attention_call, attention_inputs, packed_qkv, sdpa_backend_used

import alignclip_kernels as ak
from alignclip_kernels import roofline
from conftest import CUDA, DEVICE, measure, needs_cuda

if CUDA:
    SHAPES = {"ViT-B/16 B=108": (108, 12, 197, 64), "ViT-L/14 B=32": (32, 16, 257, 64)}
    DTYPE = torch.bfloat16
else:
    SHAPES = {"ViT-B/16 B=4": (4, 12, 197, 64)}
    DTYPE = torch.float32


def _setup(provider, shape):
    needs_cuda(provider)
    b, h, n, d = SHAPES[shape]
    qkv = packed_qkv(b, h, n, d, DTYPE, DEVICE)
    leaves, (q, k, v) = attention_inputs(provider, qkv)
    call = attention_call(provider)
    try:
        with torch.no_grad():
            call(q, k, v)
    except (RuntimeError, NotImplementedError) as exc:   # a pinned SDPA backend that cannot run here
        pytest.skip(f"{provider} unavailable on {DEVICE.type}: {str(exc).splitlines()[0][:120]}")
    info = {"shape": [b, h, n, d], "dtype": str(DTYPE).split(".")[-1]}
    if provider in ("sdpa", "sdpa-rows"):
        info["sdpa_backend"] = sdpa_backend_used(q, k, v)
    if provider == "fused":
        info["attention_choices"] = ak.attention_choices()
    itemsize = torch.empty((), dtype=DTYPE).element_size()
    return qkv, (q, k, v), call, (b, h, n, d, itemsize), info


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ATTENTION)
def test_attention_fwd(benchmark, provider, shape):
    _, (q, k, v), call, (b, h, n, d, isz), info = _setup(provider, shape)

    def fn():
        with torch.no_grad():
            call(q, k, v)

    measure(benchmark, fn, group=f"attention-fwd {shape}", provider=provider,
            cost=roofline.attention(b, h, n, d, isz), **info)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ATTENTION)
def test_attention_fwdbwd(benchmark, provider, shape):
    if provider == "flex-rows" and not CUDA:
        pytest.skip("FlexAttention has no backward on the CPU")
    qkv, _, call, (b, h, n, d, isz), info = _setup(provider, shape)

    def fn():
        leaves, (q, k, v) = attention_inputs(provider, qkv)
        outs = [o for o in call(q, k, v) if o is not None]
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    measure(benchmark, fn, group=f"attention-fwdbwd {shape}", provider=provider,
            cost=roofline.fwd_bwd(roofline.attention, b, h, n, d, isz), **info)
