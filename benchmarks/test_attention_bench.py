"""attention-fwd / attention-fwdbwd: reference (authors' path) vs sdpa (out only, the floor)
vs fused (out + dv + CLS row) vs the CPU fallback, at ViT-B/16 and ViT-L/14 shapes."""
import pytest
import torch

import alignclip_kernels as ak
from alignclip_kernels import roofline
from conftest import CUDA, DEVICE, measure, needs_cuda
from providers import authors_attention, packed_qkv, qkv_views, sdpa_attention

if CUDA:
    SHAPES = {"ViT-B/16": (108, 12, 197, 64), "ViT-L/14": (108, 16, 257, 64)}
    DTYPES = [torch.bfloat16, torch.float16]
else:
    SHAPES = {"ViT-B/16 (B=4)": (4, 12, 197, 64)}
    DTYPES = [torch.float32]
PROVIDERS = ["reference", "sdpa", "fused", "fallback"]


def _fn(provider, q, k, v):
    """q, k, v are views of one packed projection; ours takes them through split_qkv."""
    if provider == "reference":
        return authors_attention(q, k, v)
    if provider == "sdpa":
        return (sdpa_attention(q, k, v),)
    return ak.fused_alignclip_attention(q, k, v)


def _setup(provider, shape, dtype):
    needs_cuda(provider)
    if provider == "fallback" and CUDA:
        pytest.skip("the CPU fallback is timed on machines without CUDA")
    b, h, n, d = SHAPES[shape]
    qkv = packed_qkv(b, h, n, d, dtype, DEVICE)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return qkv, (b, h, n, d, itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_fwd(benchmark, provider, shape, dtype):
    qkv, (b, h, n, d, isz) = _setup(provider, shape, dtype)
    q, k, v = qkv_views(qkv.detach())

    def fn():
        with torch.no_grad():
            _fn(provider, q, k, v)

    measure(benchmark, fn, group=f"attention-fwd {shape} {str(dtype).split('.')[-1]}",
            provider=provider, cost=roofline.attention(b, h, n, d, isz), shape=[b, h, n, d])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_fwdbwd(benchmark, provider, shape, dtype):
    qkv, (b, h, n, d, isz) = _setup(provider, shape, dtype)
    views = ak.split_qkv if provider in ("fused", "fallback") else qkv_views
    outs = _fn(provider, *views(qkv))
    grads = [torch.randn_like(o) for o in outs if o is not None]

    def fn():
        outs = [o for o in _fn(provider, *views(qkv)) if o is not None]
        torch.autograd.grad(outs, [qkv], grads)

    cost = roofline.fwd_bwd(roofline.attention, b, h, n, d, isz)
    measure(benchmark, fn, group=f"attention-fwdbwd {shape} {str(dtype).split('.')[-1]}",
            provider=provider, cost=cost, shape=[b, h, n, d])
