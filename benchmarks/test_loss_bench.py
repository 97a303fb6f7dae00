"""One group per loss op (target, aal, similarity-align, sls-mms) and bma: reference vs fused,
forward + backward, at the paper's shapes (B=108, P=196, E=512, K in {7, 65, 345}, L=5, H=12)."""
import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip import BetaMovingAverage
from alignclip_kernels import reference as ref
from alignclip_kernels import roofline
from conftest import CUDA, DEVICE, measure, needs_cuda
from providers import bma_loop

B, P, E, L, H = (108, 196, 512, 5, 12) if CUDA else (8, 196, 512, 5, 12)
KS = [7, 65, 345] if CUDA else [7, 65]
DTYPE = torch.bfloat16 if CUDA else torch.float32
ISZ = torch.empty((), dtype=DTYPE).element_size()
OPS = {"reference": ref, "fused": ak}


def _inputs(k, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens = torch.randn(B, P, E, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    tokens_dv = torch.randn(B, P, E, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    text = F.normalize(torch.randn(k, E, device=DEVICE, generator=gen), dim=-1).to(DTYPE)
    labels = torch.randint(0, k, (B,), device=DEVICE, generator=gen)
    return tokens, tokens_dv, text, labels


def _fwdbwd(loss_fn, leaves):
    def fn():
        out = loss_fn()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().square().sum() if out.dim() else out, leaves)
    return fn


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("provider", list(OPS))
def test_target(benchmark, provider, k):
    needs_cuda(provider)
    tokens, _, text, labels = _inputs(k)
    ops = OPS[provider]
    cost = roofline.fwd_bwd(roofline.token_text_target, B, P, E, ISZ)
    measure(benchmark, _fwdbwd(lambda: ops.token_text_target(tokens, text, labels), [tokens]),
            group=f"target K={k}", provider=provider, cost=cost)


@pytest.mark.parametrize("provider", list(OPS))
def test_aal(benchmark, provider):
    needs_cuda(provider)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    cls = torch.softmax(torch.randn(L, B, H, P + 1, device=DEVICE, generator=gen), -1).requires_grad_()
    target = torch.softmax(torch.randn(B, P, device=DEVICE, generator=gen), -1).requires_grad_()
    ops = OPS[provider]
    cost = roofline.fwd_bwd(roofline.aal_kl, L, B, H, P + 1)
    measure(benchmark, _fwdbwd(lambda: ops.aal_kl_loss(cls, target), [cls, target]),
            group="aal", provider=provider, cost=cost)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("provider", list(OPS))
def test_similarity_align(benchmark, provider, k):
    needs_cuda(provider)
    tokens, tokens_dv, text, _ = _inputs(k)
    ops = OPS[provider]
    cost = roofline.fwd_bwd(roofline.similarity_align, B, P, E, k, ISZ)
    measure(benchmark, _fwdbwd(lambda: ops.similarity_align_loss(tokens, tokens_dv, text), [tokens, tokens_dv]),
            group=f"similarity-align K={k}", provider=provider, cost=cost)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("provider", list(OPS))
def test_sls_mms(benchmark, provider, k):
    needs_cuda(provider)
    tokens, _, text, labels = _inputs(k)
    feats = tokens[:, 0].detach().float().requires_grad_()
    text = text.float()
    ops = OPS[provider]
    dist = ref.class_distribution(text)
    cost = roofline.fwd_bwd(roofline.sls_mms, B, E, k, 4)
    measure(benchmark, _fwdbwd(lambda: ops.sls_mms_loss(feats, text, labels, dist), [feats]),
            group=f"sls-mms K={k}", provider=provider, cost=cost)


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_bma(benchmark, provider):
    from open_clip.transformer import VisionTransformer

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
