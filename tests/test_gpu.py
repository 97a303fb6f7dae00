"""CUDA only: the compiled kernels at the paper's shapes in fp16, bf16 and fp32 (tf32x3 dots)
against the float64 reference, autotuned and static tiles, no host sync in a train step, a
CUDA-graph capture, the custom ops under torch.compile, and NaN for labels out of range.
Tolerances are normwise (see utils.TOLERANCES): fp16 rtol 2e-2, bf16 rtol 5e-2, fp32 rtol 1e-4
(three-pass TF32 products)."""
import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import check_op

pytestmark = pytest.mark.gpu
FP32_GPU = dict(rtol=1e-4, atol=1e-6)


def _packed(b, n, h, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, device="cuda", generator=gen)
    return [qkv], lambda leaves: [leaves[0][:, :, i].transpose(1, 2) for i in range(3)]


@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,n,d", [(108, 12, 197, 64), (16, 16, 257, 64), (8, 16, 257, 80)])
def test_attention_at_vit_shapes(b, h, n, d, dtype, autotune, monkeypatch):
    monkeypatch.setenv("ALIGNCLIP_AUTOTUNE", autotune)
    assert ak.backend("cuda") == "triton"
    floats, views = _packed(b, n, h, d)
    tol = FP32_GPU if dtype == torch.float32 else None
    out = check_op(ak.fused_alignclip_attention, ref.fused_alignclip_attention, floats,
                   make_leaves=views, dtype=dtype, tolerance=tol)
    assert out[0].dtype == dtype and out[2].dtype == torch.float32


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
    check_op(lambda c, t: ak.aal_loss(c, t, text.to(t.dtype), labels),
             lambda c, t: ref.aal_loss(c, t, text.to(t.dtype), labels), [cls, tokens_dv], dtype=dtype,
             tolerance=tol)


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
        # Beyond the text itself only the per-(b, c) statistics [B, 3, K] fp32 and the text norms
        # grow with K; nothing of size [B, P, K] is ever allocated.
        peaks.append(torch.cuda.max_memory_allocated() - base - k * e * 2 - 3 * b * k * 4 - 4 * k)
    assert max(peaks) - min(peaks) < 1 << 20, peaks


def test_labels_out_of_range_on_the_device_give_nan_not_garbage():
    text = F.normalize(torch.randn(5, 32, device="cuda"), dim=-1)
    feats = torch.randn(3, 32, device="cuda")
    loss, logits = ak.sls_mms_loss(feats, text, torch.tensor([0, 7, 1], device="cuda"), ak.class_distribution(text))
    assert torch.isnan(loss) and torch.isnan(logits[1]).all() and torch.isfinite(logits[0]).all()
    g = ak.token_text_target(torch.randn(3, 8, 32, device="cuda"), text, torch.tensor([0, -1, 1], device="cuda"))
    assert torch.isnan(g[1]).all() and torch.isfinite(g[0]).all()


def _tiny_step():
    from open_clip.transformer import VisionTransformer

    from alignclip import AlignCLIPLoss, AlignCLIPVisual

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=64, patch_size=16, width=128, layers=4, heads=2, mlp_ratio=2.0,
                               output_dim=64).cuda().eval()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
    criterion = AlignCLIPLoss(F.normalize(torch.randn(7, 64, device="cuda"), dim=-1))
    opt = torch.optim.AdamW(visual.parameters(), lr=1e-4, capturable=True)
    return visual, model, criterion, opt


def test_a_train_step_makes_no_host_sync():
    visual, model, criterion, opt = _tiny_step()
    images = torch.randn(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 7, (8,), device="cuda")
    criterion(model(images), labels).total.backward()     # first call: compiles and autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = criterion(model(images), labels).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_train_step_traces_fullgraph_and_captures_in_a_cuda_graph():
    visual, model, criterion, opt = _tiny_step()
    images = torch.randn(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 7, (8,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(model(images), labels).total
        loss.backward()
        return loss

    eager = step().detach()
    visual.zero_grad(set_to_none=False)
    compiled = torch.compile(lambda: criterion(model(images), labels).total, fullgraph=True)
    torch.testing.assert_close(compiled().detach(), criterion(model(images), labels).total.detach(),
                               rtol=1e-3, atol=1e-3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(captured) and torch.isfinite(eager)


@pytest.mark.parametrize("name", ["token_text_target", "aal_loss", "similarity_align_loss", "sls_mms_loss",
                                  "dual_attention"])
def test_opcheck_on_cuda(name):
    from test_library import _op_cases

    op, args = _op_cases()[name]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(op, args)
