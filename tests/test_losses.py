"""Loss ops (SPEC sections 2-5): Triton kernels under the interpreter and the PyTorch fallback
against the float64 reference, values and the gradients of every floating input."""
import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from conftest import check_op


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unit(k, e, seed):
    return F.normalize(torch.randn(k, e, generator=gen(seed)), dim=-1)


@pytest.mark.parametrize("b,p,e,k,temp", [(3, 23, 40, 5, 1.0), (1, 1, 8, 1, 0.07),
                                          (2, 49, 33, 7, 0.5)])
def test_token_text_target(b, p, e, k, temp):
    tokens = torch.randn(b, p, e, generator=gen(0))
    tokens[0, 0] = 0.0      # a zero-norm token: eps as F.normalize
    labels = torch.randint(0, k, (b,), generator=gen(1))
    out = check_op(ak.token_text_target, ref.token_text_target, [tokens, unit(k, e, 2)],
                   others=(labels,), kwargs=dict(temperature=temp))
    torch.testing.assert_close(out[0].sum(1), torch.ones(b))


def _cls_rows(n_layers, b, h, n, seed):
    return torch.softmax(3 * torch.randn(n_layers, b, h, n, generator=gen(seed)), -1)


@pytest.mark.parametrize("n_layers,b,h,n", [(5, 3, 2, 24), (1, 1, 1, 2), (2, 2, 3, 50)])
def test_aal_kl_loss(n_layers, b, h, n):
    target = torch.softmax(torch.randn(b, n - 1, generator=gen(4)), -1)
    target[0, : (n - 1) // 2] = 0.0     # exact zeros: 0·log 0 = 0
    check_op(ak.aal_kl_loss, ref.aal_kl_loss, [_cls_rows(n_layers, b, h, n, 3), target])


@pytest.mark.parametrize("seed", range(10))
def test_aal_all_mass_on_cls_stays_finite(seed):
    attn = torch.zeros(2, 2, 2, 6)
    attn[..., 0] = 1.0     # patch attention underflowed to exactly 0: degenerate layers
    attn[1, 1] = torch.softmax(torch.randn(2, 6, generator=gen(seed)), -1)
    target = torch.softmax(torch.randn(2, 5, generator=gen(100 + seed)), -1)
    out = check_op(ak.aal_kl_loss, ref.aal_kl_loss, [attn, target])
    assert torch.isfinite(out[0])


@pytest.mark.parametrize("b,p,e,k", [(3, 23, 40, 5), (1, 1, 16, 1), (2, 70, 50, 37)])
def test_similarity_align_loss(b, p, e, k):
    tokens = torch.randn(b, p, e, generator=gen(6))
    tokens[-1, -1] = 0.0
    check_op(ak.similarity_align_loss, ref.similarity_align_loss,
             [tokens, torch.randn(b, p, e, generator=gen(7)), torch.randn(k, e, generator=gen(8))])


def _sls(labels, **kw):
    def op(f, text, dist, *, impl):
        return impl(f, text, labels, dist, **kw)
    return op


@pytest.mark.parametrize("b,e,k", [(3, 40, 5), (1, 8, 1), (37, 24, 70)])
def test_sls_mms_loss(b, e, k):
    labels = torch.randint(0, k, (b,), generator=gen(9))
    text = unit(k, e, 10)
    dist = ak.class_distribution(text)
    op = _sls(labels)
    check_op(lambda *a: op(*a, impl=ak.sls_mms_loss), lambda *a: op(*a, impl=ref.sls_mms_loss),
             [torch.randn(b, e, generator=gen(11)), text, dist])


def test_sls_mms_saturated_classes_stay_finite():
    text = unit(6, 16, 12)
    f = text[[0, 1, 2, 3]] * 50.0
    f[3] = 0.0
    labels = torch.tensor([0, 1, 5, 3])
    op = _sls(labels, alpha=0.3, logit_scale=100.0, epsilon=0.9)
    loss, logits = check_op(lambda *a: op(*a, impl=ak.sls_mms_loss),
                            lambda *a: op(*a, impl=ref.sls_mms_loss),
                            [f, text, ak.class_distribution(text)])
    assert torch.isfinite(loss) and torch.isfinite(logits).all()


def test_sls_logits_gradient_flows():
    text = unit(4, 16, 13)
    f = torch.randn(5, 16, generator=gen(14), requires_grad=True)
    labels = torch.randint(0, 4, (5,), generator=gen(15))
    dist = ak.class_distribution(text)
    _, logits = ak.sls_mms_loss(f, text, labels, dist)
    _, want = ref.sls_mms_loss(f.double(), text.double(), labels, dist.double())
    w = torch.randn(5, 4, generator=gen(16))
    got = torch.autograd.grad((logits * w).sum(), f)[0]
    fd = f.detach().double().requires_grad_()
    _, want = ref.sls_mms_loss(fd, text.double(), labels, dist.double())
    torch.testing.assert_close(got.double(), torch.autograd.grad((want * w.double()).sum(), fd)[0],
                               rtol=1e-5, atol=1e-6)


def test_class_distribution_rows_are_distributions():
    dist = ak.class_distribution(unit(9, 12, 17), smoothing=35.0)
    assert dist.shape == (9, 9) and dist.dtype == torch.float32
    torch.testing.assert_close(dist.sum(1), torch.ones(9))


def test_each_loss_is_one_forward_launch_and_few_backward(launches):
    b, p, e, k = 2, 9, 16, 3
    tokens = torch.randn(b, p, e, requires_grad=True)
    tokens_dv = torch.randn(b, p, e, requires_grad=True)
    text = unit(k, e, 18).requires_grad_()
    labels = torch.tensor([0, 2])
    cls_attn = _cls_rows(2, b, 2, p + 1, 19).requires_grad_()
    cases = {
        "target": lambda: ak.token_text_target(tokens, text, labels).square().sum(),
        "aal": lambda: ak.aal_kl_loss(cls_attn, torch.softmax(torch.randn(b, p), -1)),
        "sim": lambda: ak.similarity_align_loss(tokens, tokens_dv, text),
        "sls": lambda: ak.sls_mms_loss(tokens[:, 0], text, labels,
                                       ak.class_distribution(text.detach()))[0],
    }
    for name, fn in cases.items():
        with launches() as fwd:
            loss = fn()
        assert len(fwd) == 1, (name, fwd.names)
        with launches() as bwd:
            loss.backward()
        assert 1 <= len(bwd) <= 2, (name, bwd.names)


def test_torch_fallback_matches_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tokens = torch.randn(2, 7, 12, generator=gen(20))
    text = unit(3, 12, 21)
    labels = torch.tensor([1, 2])
    check_op(ak.token_text_target, ref.token_text_target, [tokens, text], others=(labels,))
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens.flip(1), text])
    check_op(ak.aal_kl_loss, ref.aal_kl_loss,
             [_cls_rows(2, 2, 2, 8, 22), torch.softmax(torch.randn(2, 7), -1)])
    op = _sls(labels)
    check_op(lambda *a: op(*a, impl=ak.sls_mms_loss), lambda *a: op(*a, impl=ref.sls_mms_loss),
             [tokens[:, 0], text, ak.class_distribution(text)])


def test_target_that_underflows_to_exact_zeros_matches_reference():
    tokens = torch.randn(2, 30, 16, generator=gen(23))
    text = unit(3, 16, 24)
    labels = torch.tensor([0, 2])
    out = check_op(ak.token_text_target, ref.token_text_target, [tokens, text], others=(labels,),
                   kwargs=dict(temperature=1e-3))
    assert (out[0] == 0).any() and torch.isfinite(out[0]).all()


def test_similarity_align_with_different_strides_per_path():
    base = torch.randn(2, 11, 3, 24, generator=gen(25))
    tokens = base[:, :, 0]                                     # rows 3·E apart
    tokens_dv = torch.randn(2, 24, 11, generator=gen(26)).transpose(1, 2)   # E-major
    assert tokens.stride() != tokens_dv.stride()
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens_dv, unit(4, 24, 27)])


def test_float64_inputs_keep_float64_on_every_backend():
    """The Triton kernels compute in fp32; float64 inputs take the PyTorch path everywhere, so a
    float64 caller gets the reference's float64 results whichever backend is active."""
    tokens = torch.randn(2, 7, 16, dtype=torch.float64, generator=gen(28))
    text = unit(3, 16, 29).double()
    labels = torch.tensor([0, 2])
    got = ak.similarity_align_loss(tokens, tokens.flip(1), text)
    assert got.dtype == torch.float64
    assert got.item() == ref.similarity_align_loss(tokens, tokens.flip(1), text).item()
    assert ak.token_text_target(tokens, text, labels).dtype == torch.float64
