"""Dual-branch attention: Triton kernels (interpreted on the CPU) and the PyTorch path against the
float64 reference, values and the gradients of q, k and v; layouts, launches, bad input and
properties."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import attention
from alignclip_kernels import reference as ref
from utils import TOLERANCES, assert_close, check_op, gen, packed, separate

SHAPES = [  # B, H, N, D, R
    (1, 1, 1, 32, 1),
    (2, 2, 50, 64, 1),     # ViT-B/32
    (1, 2, 197, 64, 1),    # ViT-B/16: full blocks, a 16-row and a 16-key tail
    (1, 2, 37, 80, 5),     # ViT-H/14 head dim
    (1, 1, 45, 96, 0),
    (2, 1, 33, 128, 33),   # every row probed
    (1, 1, 70, 64, 3),     # probe rows in a block whose tail rows are masked
]


@pytest.mark.parametrize("b,h,n,d,rows", SHAPES)
def test_packed_views_match_reference(b, h, n, d, rows):
    floats, views = packed(b, n, h, d)
    check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views,
             kwargs=dict(rows=rows))


@pytest.mark.parametrize("return_dv", [True, False])
def test_contiguous_inputs_match_reference(return_dv):
    check_op(ak.dual_attention, ref.dual_attention, separate(2, 3, 29, 64),
             kwargs=dict(rows=2, scale=0.2, return_dv=return_dv))


def test_transposed_strides_match_reference():
    """q/k/v as [B, N, H, D] buffers seen through transpose: no unit stride on N."""
    base = separate(1, 17, 2, 32, seed=3)
    check_op(ak.dual_attention, ref.dual_attention, base,
             make_leaves=lambda xs: [x.transpose(1, 2) for x in xs], kwargs=dict(rows=1))


def test_fused_alignclip_attention_matches_reference():
    floats, views = packed(2, 21, 3, 32)
    out = check_op(ak.fused_alignclip_attention, ref.fused_alignclip_attention, floats,
                   make_leaves=views)
    assert out[2].shape == (2, 3, 21) and out[2].dtype == torch.float32
    torch.testing.assert_close(out[2].sum(-1), torch.ones(2, 3))
    none = ak.fused_alignclip_attention(*views(floats), return_dv=False, return_cls_attn=False)
    assert none[1] is None and none[2] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_on_the_cpu_match_reference(dtype):
    """fp16 runs the interpreted kernels; bf16 takes the PyTorch path there (the interpreter's
    bf16 `tl.dot` multiplies raw bit patterns), and both must match at 16-bit tolerances."""
    floats, views = packed(2, 40, 2, 64, seed=7)
    out = check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views,
                   kwargs=dict(rows=2), dtype=dtype)
    assert out[0].dtype == dtype and out[2].dtype == torch.float32


def test_bf16_under_the_interpreter_takes_the_pytorch_path(launches):
    q, k, v = (x.bfloat16() for x in separate(1, 1, 20, 32))
    with launches() as fwd:
        out, _, _ = ak.dual_attention(q, k, v)
    assert len(fwd) == 0 and torch.isfinite(out).all()


def test_forward_is_one_launch_backward_three(launches):
    (qkv,), views = packed(1, 40, 2, 64)
    qkv.requires_grad_()
    with launches() as fwd:
        out, dv, cls = ak.fused_alignclip_attention(*views([qkv]))
    assert fwd.names == ["_attn_fwd_kernel"]
    with launches() as bwd:
        (out.sum() + dv.square().sum() + cls.sum()).backward()
    assert bwd.names == ["_attn_bwd_preprocess_kernel", "_attn_bwd_main_kernel", "_attn_bwd_dq_kernel"]


def test_dv_is_a_view_of_packed_qkv_and_its_gradient_lands(launches):
    (qkv,), views = packed(2, 9, 3, 32)
    qkv.requires_grad_()
    q, k, v = views([qkv])
    out, dv, _ = ak.fused_alignclip_attention(q, k, v)
    start = qkv.data_ptr()
    end = start + qkv.numel() * qkv.element_size()
    assert start <= dv.data_ptr() < end, "dv must be a view into the packed QKV storage"
    torch.testing.assert_close(dv, v.transpose(1, 2).reshape(2, 9, 96))
    weight = torch.randn_like(dv)
    with launches() as bwd:
        (dv * weight).sum().backward()
    assert len(bwd) == 3, "d(dv) must fold into the dK/dV kernel, no extra pass"
    torch.testing.assert_close(qkv.grad[:, :, 2], weight.view(2, 9, 3, 32))
    torch.testing.assert_close(qkv.grad[:, :, :2], torch.zeros(2, 9, 2, 3, 32))


def test_dv_is_written_when_strides_forbid_a_view():
    q, k, v = separate(1, 2, 7, 32)
    _, dv, _ = ak.fused_alignclip_attention(q, k, v)
    assert dv.is_contiguous() and dv.data_ptr() != v.data_ptr()
    torch.testing.assert_close(dv, v.transpose(1, 2).reshape(1, 7, 64))


def test_pytorch_path_matches_reference(torch_path):
    assert ak.backend("cpu") == "torch"
    floats, views = packed(2, 23, 2, 64)
    check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views,
             kwargs=dict(rows=3))
    check_op(ak.dual_attention, ref.dual_attention, separate(1, 2, 5, 32), kwargs=dict(rows=0))


def test_pytorch_path_keeps_the_rows_fp32_under_autocast(torch_path):
    q, k, v = separate(1, 2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, rows = ak.dual_attention(q, k, v, rows=2)
    assert rows.dtype == torch.float32


def test_backend_reports_path():
    assert ak.backend("cpu") in ("triton-interpreter", "torch")
    assert ak.backend("cuda") in ("triton", "triton-interpreter")
    assert ak.backend("meta") == "torch"


def test_extreme_scores_stay_finite_and_match():
    q, k, v = separate(1, 1, 19, 32, seed=5)
    q = q * 300.0   # scores of order ±1e4
    out, _, rows = ak.dual_attention(q, k, v, rows=2)
    want, _, want_rows = ref.dual_attention(q.double(), k.double(), v.double(), rows=2)
    assert torch.isfinite(out).all() and torch.isfinite(rows).all()
    assert_close("out", out, want, rtol=1e-4, atol=1e-6)
    assert_close("rows", rows, want_rows, rtol=1e-3, atol=1e-6)


def test_pytorch_path_supports_torch_func(torch_path):
    q, k, v = separate(1, 1, 6, 32, seed=2)

    def loss(q):
        out, _, rows = ak.dual_attention(q, k, v, rows=1)
        return out.square().sum() + rows.sum()

    g = torch.func.grad(loss)(q)
    torch.testing.assert_close(g, torch.autograd.grad(loss(q.requires_grad_()), q)[0])
    per_sample = torch.func.vmap(torch.func.grad(lambda x: loss(x[None, None])), in_dims=0)(q[0])
    assert per_sample.shape == q[0].shape


BAD = [
    (lambda q, k, v: ak.dual_attention(q[0], k, v), ValueError, "q must have shape"),
    (lambda q, k, v: ak.dual_attention(q, k[:, :, :3], v), ValueError, "k must have the shape"),
    (lambda q, k, v: ak.dual_attention(q, k, v.half()), TypeError, "v has dtype"),
    (lambda q, k, v: ak.dual_attention(q.long(), k.long(), v.long()), TypeError, "floating"),
    (lambda q, k, v: ak.dual_attention(q, k, v, rows=6), ValueError, "rows must be in"),
    (lambda q, k, v: ak.dual_attention(q, k, v, rows=-1), ValueError, "rows must be in"),
    (lambda q, k, v: ak.dual_attention(q, k, v, rows=1.0), TypeError, "rows must be an int"),
    (lambda q, k, v: ak.dual_attention(q, k, v, scale=0.0), ValueError, "scale"),
    (lambda q, k, v: ak.dual_attention(q, k, v, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: ak.dual_attention(q[..., :20], k[..., :20], v[..., :20]), ValueError, "head dim"),
    (lambda q, k, v: ak.dual_attention(q.double(), k.double(), v.double()), TypeError, "float64"),
    (lambda q, k, v: ak.dual_attention("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: ak.split_qkv(q), ValueError, "qkv must have shape"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_is_refused_by_name(call, exc, match):
    q, k, v = separate(1, 2, 5, 32)
    with pytest.raises(exc, match=match):
        call(q, k, v)


def test_split_qkv_gradient_is_the_packed_buffer_the_kernel_wrote(monkeypatch):
    (qkv,), _ = packed(2, 13, 3, 32)
    returned = []
    real = attention._SplitQKV.backward

    def spy(ctx, dq, dk, dv):
        grad = real(ctx, dq, dk, dv)
        returned.append((grad.data_ptr() == dq.data_ptr(), attention._is_packed(dq, dk, dv)))
        return grad

    monkeypatch.setattr(attention._SplitQKV, "backward", staticmethod(spy))
    out = check_op(ak.dual_attention, ref.dual_attention, [qkv],
                   make_leaves=lambda xs: list(ak.split_qkv(xs[0])) if xs[0].dtype != torch.float64
                   else [xs[0][:, :, i].transpose(1, 2) for i in range(3)], kwargs=dict(rows=2))
    assert out[1]._base is not None               # dv still a view of the packed projection
    assert returned == [(True, True)], "the packed gradient must be handed on without a copy"


def test_split_qkv_assembles_when_gradients_are_not_packed():
    (qkv,), _ = packed(1, 7, 2, 32)
    leaf = qkv.clone().requires_grad_()
    q, k, v = ak.split_qkv(leaf)
    (k.sum() * 2).backward()                        # only k receives a gradient
    want = torch.zeros_like(leaf)
    want[:, :, 1] = 2.0
    torch.testing.assert_close(leaf.grad, want)


@st.composite
def attention_case(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 300))
    d = draw(st.sampled_from([32, 64, 80, 128]))
    rows = draw(st.integers(0, min(n, 4)))
    layout = draw(st.sampled_from(["packed", "separate", "bnhd"]))
    return b, h, n, d, rows, layout, draw(st.integers(0, 2 ** 16))


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(attention_case())
def test_property_any_shape_and_layout_matches_reference(case):
    b, h, n, d, rows, layout, seed = case
    g = gen(seed)
    if layout == "packed":
        floats = [torch.randn(b, n, 3, h, d, generator=g)]
        views = lambda xs: [xs[0][:, :, i].transpose(1, 2) for i in range(3)]  # noqa: E731
    elif layout == "bnhd":
        floats = [torch.randn(b, n, h, d, generator=g) for _ in range(3)]
        views = lambda xs: [x.transpose(1, 2) for x in xs]  # noqa: E731
    else:
        floats = [torch.randn(b, h, n, d, generator=g) for _ in range(3)]
        views = None
    check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views,
             kwargs=dict(rows=rows), seed=seed, tolerance=TOLERANCES[torch.float32])
