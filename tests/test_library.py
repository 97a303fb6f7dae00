"""torch.library registration: every Triton op is a custom op with a fake implementation and
autograd (opcheck, under the interpreter), and the model with its loss compiles with
fullgraph=True on the PyTorch path."""
import os

import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak  # noqa: F401  (registers the ops)
from utils import cls_rows, gen, unit

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the custom ops launch Triton kernels")


def _op_cases():
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
        "token_text_target": (ops.token_text_target, (tokens, text, labels, 0.5)),
        "aal_kl_loss": (ops.aal_kl_loss, (cls, target)),
        "aal_loss": (ops.aal_loss, (cls, tokens_dv, text, labels, 1.0)),
        "similarity_align_loss": (ops.similarity_align_loss, (tokens, tokens_dv, text)),
        "sls_mms_loss": (ops.sls_mms_loss, (feats, text, labels, dist, 0.3, 100.0, 0.9)),
        "dual_attention": (ops.dual_attention, (q, k, v, 2, 32 ** -0.5, True)),
    }


@interpreted
@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(name):
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args)


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
