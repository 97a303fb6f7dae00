"""CUDA only: the compiled kernels at the paper's shapes in fp16, bf16 and fp32 (tf32x3 dots),
against the float64 reference. Tolerances are normwise (see conftest.TOLERANCES): fp16
rtol 2e-2, bf16 rtol 5e-2, fp32 rtol 1e-4 (three-pass TF32 products)."""
import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from conftest import check_op

pytestmark = pytest.mark.gpu
FP32_GPU = dict(rtol=1e-4, atol=1e-6)


def _packed(b, n, h, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, device="cuda", generator=gen)
    return [qkv], lambda leaves: [leaves[0][:, :, i].transpose(1, 2) for i in range(3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,n,d", [(108, 12, 197, 64), (16, 16, 257, 64), (8, 16, 257, 80)])
def test_attention_at_vit_shapes(b, h, n, d, dtype):
    assert ak.backend("cuda") == "triton"
    floats, views = _packed(b, n, h, d)
    tol = FP32_GPU if dtype == torch.float32 else None
    out = check_op(ak.fused_alignclip_attention, ref.fused_alignclip_attention, floats,
                   make_leaves=views, dtype=dtype, tolerance=tol)
    assert out[0].dtype == dtype and out[2].dtype == torch.float32
    assert out[1].data_ptr() != out[0].data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [7, 65, 345])
def test_losses_at_paper_shapes(k, dtype):
    b, p, e, n_layers, h = 108, 196, 512, 5, 12
    gen = torch.Generator(device="cuda").manual_seed(k)
    tokens = torch.randn(b, p, e, device="cuda", generator=gen)
    tokens_dv = torch.randn(b, p, e, device="cuda", generator=gen)
    text = F.normalize(torch.randn(k, e, device="cuda", generator=gen), dim=-1)
    labels = torch.randint(0, k, (b,), device="cuda", generator=gen)
    tol = FP32_GPU if dtype == torch.float32 else None
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens_dv, text],
             dtype=dtype, tolerance=tol)
    check_op(ak.token_text_target, ref.token_text_target, [tokens_dv, text], others=(labels,),
             dtype=dtype, tolerance=tol)
    dist = ak.class_distribution(text)
    check_op(lambda f, t, c: ak.sls_mms_loss(f, t, labels, c),
             lambda f, t, c: ref.sls_mms_loss(f, t, labels, c),
             [tokens[:, 0], text, dist], dtype=dtype, tolerance=tol)
    cls = torch.softmax(torch.randn(n_layers, b, h, p + 1, device="cuda", generator=gen), -1)
    target = torch.softmax(torch.randn(b, p, device="cuda", generator=gen), -1)
    check_op(ak.aal_kl_loss, ref.aal_kl_loss, [cls, target], tolerance=FP32_GPU)


def test_similarity_align_peak_memory_is_independent_of_k():
    b, p, e = 108, 196, 512
    peaks = []
    for k in (7, 345, 1000):
        tokens = torch.randn(b, p, e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        tokens_dv = torch.randn_like(tokens, requires_grad=True)
        text = F.normalize(torch.randn(k, e, device="cuda"), dim=-1).bfloat16()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ak.similarity_align_loss(tokens, tokens_dv, text).backward()
        torch.cuda.synchronize()
        # Beyond the text itself, only the per-(b, c) softmax statistics [B, 3, K] fp32 grow
        # with K; nothing of size [B, P, K] is ever allocated.
        peaks.append(torch.cuda.max_memory_allocated() - base - k * e * 2 - 3 * b * k * 4)
    assert max(peaks) - min(peaks) < 1 << 20, peaks
