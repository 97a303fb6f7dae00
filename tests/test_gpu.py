"""CUDA only: the compiled kernels at the paper's shapes in fp16, bf16 and fp32 (tf32x3 dots)
against the float64 reference, autotuned and static tiles and every autotune candidate, the
losses split (B=108 on 132 SMs) and not (B=256), the deterministic mode (bitwise-repeatable
train steps), no host sync in a train step, CUDA-graph replays equal to eager, the custom ops
under torch.compile, launches on a second GPU, and NaN for labels out of range.
Tolerances are normwise (see utils.TOLERANCES): fp16 rtol 2e-2, bf16 rtol 5e-2, fp32 rtol 1e-4
(three-pass TF32 products)."""
import os

import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip_kernels import attention
from alignclip_kernels import reference as ref
from utils import TOLERANCES, assert_close, check_op

# cuBLAS needs a fixed workspace for deterministic results; it reads this when first used.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.gpu
FP32_GPU = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The kernels' tests run the kernels (`auto` could pick the SDPA composite); the choice's
    own tests unset this."""
    monkeypatch.setenv("ALIGNCLIP_ATTENTION", "triton")


def _packed(b, n, h, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, device="cuda", generator=gen)
    return [qkv], lambda leaves: [leaves[0][:, :, i].transpose(1, 2) for i in range(3)]


@pytest.mark.parametrize("autotune", [pytest.param("1", marks=pytest.mark.autotuned), "0"])
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


@pytest.mark.parametrize("d", [64, 80, 88])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_autotune_candidate_matches_reference(dtype, d):
    """Candidates that lose the autotuning here could win on another GPU or shape: each one is
    held to the reference, forward and backward, with d(rows) and d(dv)."""
    b, h, n = 16, 12, 197
    floats, views = _packed(b, n, h, d)
    candidates = attention.autotune_candidates(d, dtype, torch.device("cuda"))
    tol = FP32_GPU if dtype == torch.float32 else TOLERANCES[dtype]
    leaves = [floats[0].to(dtype)]
    q, k, v = views(leaves)
    base = floats[0].to(dtype).double().requires_grad_()
    want_q, want_k, want_v = views([base])
    want = ref.dual_attention(want_q, want_k, want_v, rows=1)
    ups = [torch.randn_like(w) for w in want]
    want_grads = torch.autograd.grad(want, (want_q, want_k, want_v), ups)
    for i in range(max(len(candidates["fwd"]), len(candidates["bwd"]))):
        fwd = candidates["fwd"][min(i, len(candidates["fwd"]) - 1)]
        bwd = candidates["bwd"][min(i, len(candidates["bwd"]) - 1)]
        out, lse, rows = attention._attention_fwd(q, k, v, 1, d ** -0.5, None, fwd)
        dv_view = attention.merged_view(v)
        for name, got, expected in (("out", out, want[0]), ("dv", dv_view, want[1]), ("rows", rows, want[2])):
            assert_close(f"candidate #{i} {fwd}: {name}", got, expected, **tol)
        grads = [torch.empty_like(x) for x in (q, k, v)]
        attention._attention_bwd(ups[0].to(dtype), ups[1].to(dtype), ups[2].float(), q, k, v, out, lse, rows, 1,
                                 d ** -0.5, *grads, config=bwd)
        for name, got, expected in zip("qkv", grads, want_grads):
            assert_close(f"candidate #{i} {bwd}: d{name}", got, expected, **tol)


@pytest.mark.parametrize("b", [108, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [7, 65, 345])
def test_losses_at_paper_shapes(k, dtype, b):
    """B=108 leaves SMs idle, so images split over programs (the combine); B=256 does not."""
    p, e, n_layers, h = 196, 512, 5, 12
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
    with torch.autocast("cuda", dtype=torch.bfloat16):     # warm-up in the checked dtype: the
        loss = criterion(model(images), labels).total      # first call compiles and autotunes
    loss.backward()
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
    assert torch.isfinite(eager)
    # Each replay on new images equals eager on them: a stale ticket or accumulator would not.
    for seed in (1, 2):
        images.copy_(torch.randn(images.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        visual.zero_grad(set_to_none=False)
        graph.replay()
        torch.cuda.synchronize()
        replayed = captured.clone(), [p.grad.clone() for p in visual.parameters()]
        visual.zero_grad(set_to_none=False)
        fresh = step().detach()
        torch.testing.assert_close(replayed[0], fresh, rtol=1e-3, atol=1e-4)
        for got, p in zip(replayed[1], visual.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=2e-2, atol=1e-4)


def _train_step_state(steps=3):
    visual, model, criterion, opt = _tiny_step()
    gen = torch.Generator("cuda").manual_seed(3)
    for _ in range(steps):
        images = torch.randn(8, 3, 64, 64, device="cuda", generator=gen)
        labels = torch.randint(0, 7, (8,), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(model(images), labels).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.detach(), {k: v.detach().clone() for k, v in visual.state_dict().items()}


def test_deterministic_mode_makes_train_steps_bitwise_repeatable():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _train_step_state(), _train_step_state()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first[0], second[0])
    for key, value in first[1].items():
        assert torch.equal(value, second[1][key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deterministic_mode_at_paper_shapes_matches_reference(dtype):
    floats, views = _packed(108, 197, 12, 64)
    tol = FP32_GPU if dtype == torch.float32 else None
    check_op(lambda q, k, v: ak.fused_alignclip_attention(q, k, v, deterministic=True),
             ref.fused_alignclip_attention, floats, make_leaves=views, dtype=dtype, tolerance=tol)
    b, p, e, k = 108, 196, 512, 345
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, tokens_dv = (torch.randn(b, p, e, device="cuda", generator=gen) for _ in range(2))
    text = F.normalize(torch.randn(k, e, device="cuda", generator=gen), dim=-1)
    labels = torch.randint(0, k, (b,), device="cuda", generator=gen)
    check_op(lambda u, w, t: ak.similarity_align_loss(u, w, t, deterministic=True), ref.similarity_align_loss,
             [tokens, tokens_dv, text], dtype=dtype, tolerance=tol)
    check_op(lambda u, t: ak.token_text_target(u, t, labels, deterministic=True),
             lambda u, t: ref.token_text_target(u, t, labels), [tokens_dv, text], dtype=dtype, tolerance=tol)
    dist = ak.class_distribution(text)
    check_op(lambda f, t, c: ak.sls_mms_loss(f, t, labels, c, deterministic=True),
             lambda f, t, c: ref.sls_mms_loss(f, t, labels, c), [tokens[:, 0], text, dist], dtype=dtype,
             tolerance=tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_follow_the_tensors_device_not_the_current_one():
    floats, views = _packed(2, 50, 2, 64)
    qkv = floats[0].to("cuda:1").requires_grad_()
    with torch.cuda.device(0):
        out, dv, rows = ak.fused_alignclip_attention(*views([qkv]))
        (out.sum() + rows.sum()).backward()
        loss = ak.similarity_align_loss(out[:, 1:].float(), dv[:, 1:].float(),
                                        F.normalize(torch.randn(5, 128, device="cuda:1"), dim=-1))
    want = ref.fused_alignclip_attention(*views([floats[0].double().to("cuda:1")]))
    torch.testing.assert_close(out.double(), want[0], rtol=1e-4, atol=1e-5)
    assert out.device.index == 1 and torch.isfinite(loss) and torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("name", ["token_text_target", "aal_loss", "similarity_align_loss", "sls_mms_loss",
                                  "dual_attention"])
def test_opcheck_on_cuda(name):
    from test_library import _op_cases

    op, args = _op_cases()[name]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    torch.library.opcheck(op, args)


def test_the_choice_on_cuda_times_each_key_once_and_keeps_it(monkeypatch, tmp_path):
    from alignclip_kernels import attention_choice

    monkeypatch.delenv("ALIGNCLIP_ATTENTION", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(attention_choice, "_CHOICES", {})
    floats, views = _packed(108, 197, 12, 64)
    for _ in range(2):
        qkv = floats[0].to(torch.bfloat16).requires_grad_()
        out, dv, cls = ak.fused_alignclip_attention(*ak.split_qkv(qkv))
        (out.float().sum() + cls.sum()).backward()
    (key, entry), = ak.attention_choices().items()
    assert entry["source"] == "timed" and entry["path"] in ("triton", "sdpa"), entry
    assert os.path.exists(attention_choice.cache_file())


@pytest.mark.parametrize("path", ["triton", "sdpa"])
def test_a_non_finite_query_row_gives_a_nan_row_on_cuda(path, monkeypatch):
    """On CUDA the composite adds no NaN guard: SDPA's backends must propagate it themselves."""
    monkeypatch.setenv("ALIGNCLIP_ATTENTION", path)
    q, k, v = (torch.randn(2, 2, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q[0, 1, 5, 3] = float("nan")
    out, _, rows = ak.dual_attention(q, k, v, rows=1)
    assert torch.isnan(out.view(2, 197, 2, 64)[0, 5, 1]).all() and torch.isfinite(out.view(2, 197, 2, 64)[1]).all()


def test_deterministic_bits_do_not_depend_on_autotuning(monkeypatch):
    """Deterministic mode runs the static tiles: what a machine's autotuner picked cannot move
    a bit."""
    floats, views = _packed(108, 197, 12, 64)
    results = []
    for autotune in ("1", "0"):
        monkeypatch.setenv("ALIGNCLIP_AUTOTUNE", autotune)
        qkv = floats[0].to(torch.bfloat16).requires_grad_()
        out, dv, cls = ak.fused_alignclip_attention(*ak.split_qkv(qkv), deterministic=True)
        (out.float().square().sum() + cls.sum()).backward()
        results.append((out, cls, qkv.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_pixel_transform_on_cuda_equals_the_pytorch_path():
    from alignclip_kernels.pixels import JITTER_COLUMNS, _torch_pixel_transform

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (108, 224, 224, 3), dtype=torch.uint8, generator=gen)
    flip = (torch.rand(108, generator=gen) > 0.5).float()
    jitter = torch.zeros(108, JITTER_COLUMNS)
    jitter[:, :3] = torch.empty(108, 3).uniform_(0.7, 1.3, generator=gen)
    jitter[:, 3] = torch.empty(108).uniform_(-0.3, 0.3, generator=gen)
    jitter[:, 4:8] = torch.stack([torch.randperm(4, generator=gen) for _ in range(108)]).float()
    jitter[:, 8] = (torch.rand(108, generator=gen) < 0.1).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want_plain = _torch_pixel_transform(images, mean, std, flip, None)
    want = _torch_pixel_transform(images, mean, std, flip, jitter)
    cuda = [t.cuda() for t in (images, mean, std, flip, jitter)]
    assert torch.equal(ak.pixel_transform(*cuda[:3], flip=cuda[3]).cpu(), want_plain)
    torch.testing.assert_close(ak.pixel_transform(*cuda[:3], flip=cuda[3], jitter=cuda[4]).cpu(), want,
                               rtol=0, atol=1e-5)


def test_the_benchmarks_rivals_compute_our_contract():
    """`sdpa-rows-*` and `flex-rows` (benchmarks/providers.py) return our outputs and gradients:
    a faster rival would otherwise be a rival of another op."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from providers import ATTENTION, RIVALS, attention_call, attention_inputs

    assert set(RIVALS) <= set(ATTENTION)
    qkv = torch.randn(16, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    (leaf,), views = attention_inputs("fused-triton", qkv)
    want = attention_call("fused-triton")(*views)
    grads = [torch.randn_like(w, dtype=w.dtype) for w in want]
    want_grad = torch.autograd.grad(want, [leaf], grads)[0]
    for provider in RIVALS:
        (leaf,), views = attention_inputs(provider, qkv)
        try:
            got = attention_call(provider)(*views)
        except RuntimeError as exc:   # a pinned backend this GPU lacks
            pytest.skip(f"{provider}: {exc}")
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=1e-2, msg=provider)
        got_grad = torch.autograd.grad(got, [leaf], grads)[0]
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=5e-2, atol=2e-2, msg=provider)
