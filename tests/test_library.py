"""Library-wide contracts: every Triton op is a custom op with a fake implementation and
autograd (opcheck, under the interpreter); every public op takes its PyTorch path without CUDA
or the interpreter; the kernels refuse double backward by name; the model with its loss
compiles with fullgraph=True on the PyTorch path."""
import os

import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import cls_rows, gen, unit

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the custom ops launch Triton kernels")


def _op_cases(exact_order=False):
    """Each custom op with arguments; the last, `exact_order`, is the deterministic mode."""
    tokens = torch.randn(2, 9, 16, generator=gen(0), requires_grad=True)
    tokens_dv = torch.randn(2, 9, 16, generator=gen(1), requires_grad=True)
    text = unit(3, 16, 2).requires_grad_()
    labels = torch.tensor([0, 2])
    cls = cls_rows(2, 2, 2, 10, 3).requires_grad_()
    target = torch.softmax(torch.randn(2, 9, generator=gen(4)), -1).requires_grad_()
    feats = torch.randn(2, 16, generator=gen(5), requires_grad=True)
    dist = torch.softmax(torch.randn(3, 3, generator=gen(6)), -1).requires_grad_()
    q, k, v = (torch.randn(1, 2, 20, 32, generator=gen(7 + i), requires_grad=True) for i in range(3))
    ops = torch.ops.alignclip
    return {
        "token_text_target": (ops.token_text_target, (tokens, text, labels, 0.5, exact_order)),
        "aal_kl_loss": (ops.aal_kl_loss, (cls, target, exact_order)),
        "aal_loss": (ops.aal_loss, (cls, tokens_dv, text, labels, 1.0, exact_order)),
        "similarity_align_loss": (ops.similarity_align_loss, (tokens, tokens_dv, text, exact_order)),
        "sls_mms_loss": (ops.sls_mms_loss, (feats, text, labels, dist, 0.3, 100.0, 0.9, exact_order)),
        "dual_attention": (ops.dual_attention, (q, k, v, 2, 32 ** -0.5, True, exact_order)),
    }


@interpreted
@pytest.mark.parametrize("exact_order", [False, True])
@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(name, exact_order):
    op, args = _op_cases(exact_order)[name]
    torch.library.opcheck(op, args)


def _public_cases():
    """(public op, its oracle, float inputs, other inputs), one small case per op."""
    tokens, tokens_dv = torch.randn(2, 7, 12, generator=gen(20)), torch.randn(2, 7, 12, generator=gen(21))
    text, labels = unit(3, 12, 22), torch.tensor([1, 2])
    cls = cls_rows(2, 2, 2, 8, 23)
    feats = torch.randn(2, 12, generator=gen(24))
    q, k, v = (torch.randn(1, 2, 9, 32, generator=gen(25 + i)) for i in range(3))
    return {
        "token_text_target": (ak.token_text_target, ref.token_text_target, [tokens, text], [labels]),
        "aal_kl_loss": (ak.aal_kl_loss, ref.aal_kl_loss, [cls, torch.softmax(tokens[:, :, 0], -1)], []),
        "aal_loss": (ak.aal_loss, ref.aal_loss, [cls, tokens_dv, text], [labels]),
        "similarity_align_loss": (ak.similarity_align_loss, ref.similarity_align_loss,
                                  [tokens, tokens_dv, text], []),
        "sls_mms_loss": (lambda f, t, d: ak.sls_mms_loss(f, t, labels, d)[0],
                         lambda f, t, d: ref.sls_mms_loss(f, t, labels, d)[0],
                         [feats, text, ak.class_distribution(text)], []),
        "dual_attention": (lambda *x: ak.dual_attention(*x, rows=1)[0],
                           lambda *x: ref.dual_attention(*x, rows=1)[0], [q, k, v], []),
    }


def _no_kernel_launches(monkeypatch):
    import triton.runtime.interpreter as interpreter
    from triton.runtime.jit import JITFunction

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched on the PyTorch path")

    monkeypatch.setattr(JITFunction, "run", refuse)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", refuse)


@pytest.mark.parametrize("name", list(_public_cases()))
def test_without_cuda_or_the_interpreter_every_op_runs_its_pytorch_path(name, torch_path, monkeypatch):
    """The training package runs anywhere: no kernel is launched, values and gradients equal the
    oracle's, and the PyTorch path alone supports double backward."""
    _no_kernel_launches(monkeypatch)
    op, oracle, floats, others = _public_cases()[name]
    ours = [x.clone().requires_grad_() for x in floats]
    theirs = [x.clone().requires_grad_() for x in floats]
    got, want = op(*ours, *others), oracle(*theirs, *others)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), ours, create_graph=True)
    g_want = torch.autograd.grad(want.square().sum(), theirs, create_graph=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert g_got[0].requires_grad


@interpreted
@pytest.mark.parametrize("name", list(_public_cases()))
def test_double_backward_through_a_kernel_is_refused_clearly(name):
    op, _, floats, others = _public_cases()[name]
    leaves = [x.clone().requires_grad_() for x in floats]
    out = op(*leaves, *others)
    with pytest.raises(RuntimeError, match=f"{name.split('(')[0]}.*double backward"):
        torch.autograd.grad(out.square().sum(), leaves, create_graph=True)


def _tiny_model_and_loss():
    from open_clip.transformer import VisionTransformer

    from alignclip import AlignCLIPLoss, AlignCLIPVisual

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=3, heads=2, mlp_ratio=2.0,
                               output_dim=32).eval()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
    return model, AlignCLIPLoss(F.normalize(torch.randn(4, 32), dim=-1))


def test_model_and_loss_compile_fullgraph_on_the_pytorch_path(torch_path):
    model, criterion = _tiny_model_and_loss()
    images = torch.randn(2, 3, 32, 32, generator=gen(8))
    labels = torch.tensor([1, 3])

    def step(images, labels):
        return criterion(model(images), labels).total

    eager = step(images, labels)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(images, labels)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_model_and_loss_under_cpu_bf16_autocast_are_finite_with_fp32_sls_logits(torch_path):
    model, criterion = _tiny_model_and_loss()
    images = torch.randn(2, 3, 32, 32, generator=gen(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        terms = criterion(out, torch.tensor([0, 2]))
    assert out.tokens.dtype == torch.bfloat16 and out.cls_attn.dtype == torch.float32
    assert terms.logits.dtype == torch.float32
    assert all(torch.isfinite(t) for t in (terms.total, terms.sls, terms.aal, terms.sim_align))
    terms.total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_setup_py_defers_to_pyproject():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["alignclip-kernels", "0.2.0"]
