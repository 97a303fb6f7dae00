"""sls_mms_loss and class_distribution against the float64 reference: the loss, the logits and the
gradients of the features, the text and the class relations; launches, bad input, properties."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import check_op, gen, refusal_test, unit


def _with_labels(labels, **kw):
    def op(f, text, dist, *, impl):
        return impl(f, text, labels, dist, **kw)
    return (lambda *a: op(*a, impl=ak.sls_mms_loss)), (lambda *a: op(*a, impl=ref.sls_mms_loss))


@pytest.mark.parametrize("b,e,k", [(3, 40, 5), (1, 8, 1), (37, 24, 70), (2, 64, 65), (1, 32, 345)])
def test_matches_reference(b, e, k):
    labels = torch.randint(0, k, (b,), generator=gen(9))
    text = unit(k, e, 10)
    ours, oracle = _with_labels(labels)
    check_op(ours, oracle, [torch.randn(b, e, generator=gen(11)), text, ak.class_distribution(text)])


def test_saturated_classes_and_a_zero_feature_stay_finite():
    text = unit(6, 16, 12)
    f = text[[0, 1, 2, 3]] * 50.0
    f[3] = 0.0
    ours, oracle = _with_labels(torch.tensor([0, 1, 5, 3]), alpha=0.3, logit_scale=100.0, epsilon=0.9)
    loss, logits = check_op(ours, oracle, [f, text, ak.class_distribution(text)])
    assert torch.isfinite(loss) and torch.isfinite(logits).all()


def test_logits_gradient_alone_flows():
    text = unit(4, 16, 13)
    f = torch.randn(5, 16, generator=gen(14), requires_grad=True)
    labels = torch.randint(0, 4, (5,), generator=gen(15))
    dist = ak.class_distribution(text)
    _, logits = ak.sls_mms_loss(f, text, labels, dist)
    w = torch.randn(5, 4, generator=gen(16))
    got = torch.autograd.grad((logits * w).sum(), f)[0]
    fd = f.detach().double().requires_grad_()
    _, want = ref.sls_mms_loss(fd, text.double(), labels, dist.double())
    torch.testing.assert_close(got.double(), torch.autograd.grad((want * w.double()).sum(), fd)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_on_the_cpu_match_reference(dtype):
    text = unit(7, 32, 2)
    ours, oracle = _with_labels(torch.tensor([0, 3, 6, 6]))
    check_op(ours, oracle, [torch.randn(4, 32, generator=gen(3)), text, ak.class_distribution(text)],
             dtype=dtype)


def test_one_launch_each_way(launches):
    text = unit(3, 16, 18)
    f = torch.randn(2, 16, requires_grad=True)
    with launches() as fwd:
        loss, _ = ak.sls_mms_loss(f, text, torch.tensor([0, 2]), ak.class_distribution(text))
    with launches() as bwd:
        loss.backward()
    assert fwd.names == ["_sls_fwd_kernel"] and bwd.names == ["_sls_bwd_kernel"]


def test_class_distribution_rows_are_distributions():
    dist = ak.class_distribution(unit(9, 12, 17), smoothing=35.0)
    assert dist.shape == (9, 9) and dist.dtype == torch.float32
    torch.testing.assert_close(dist.sum(1), torch.ones(9))


F_ = torch.randn(2, 8)
TEXT = unit(3, 8, 0)
LABELS = torch.tensor([0, 2])
DIST = ak.class_distribution(TEXT)
BAD = {
    "features rank": (lambda: ak.sls_mms_loss(F_[None], TEXT, LABELS, DIST), ValueError, r"image_features must have shape \[B, E\]"),
    "dist shape": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS, DIST[:2]), ValueError, r"class_dist must have shape \[K, K\]"),
    "label range": (lambda: ak.sls_mms_loss(F_, TEXT, torch.tensor([5, 0]), DIST), ValueError, "labels must hold class indices"),
    "uint8 labels": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS.to(torch.uint8), DIST), TypeError, "labels must be an integer"),
    "logit_scale 0": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS, DIST, logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
    "logit_scale inf": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS, DIST, logit_scale=float("inf")), ValueError, "logit_scale"),
    "alpha nan": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS, DIST, alpha=float("nan")), ValueError, "alpha must be finite"),
    "epsilon inf": (lambda: ak.sls_mms_loss(F_, TEXT, LABELS, DIST, epsilon=float("inf")), ValueError, "epsilon must be finite"),
    "width": (lambda: ak.sls_mms_loss(F_, TEXT[:, :4], LABELS, DIST), ValueError, "text: width E"),
    "dtype mix": (lambda: ak.sls_mms_loss(F_.half(), TEXT, LABELS, DIST), TypeError, "text has dtype"),
    "dist rank": (lambda: ak.class_distribution(TEXT[0]), ValueError, r"text must have shape \[K, E\]"),
    "dist smoothing": (lambda: ak.class_distribution(TEXT, smoothing=0.0), ValueError, "smoothing must be finite and > 0"),
    "dist int": (lambda: ak.class_distribution(TEXT.long()), TypeError, "text must be a floating"),
    "dist empty": (lambda: ak.class_distribution(TEXT[:0]), ValueError, "K, E >= 1"),
}


test_bad_input_is_refused_by_name = refusal_test(BAD)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 12), st.integers(2, 96), st.integers(1, 80), st.integers(0, 2 ** 16))
def test_property_any_shape(b, e, k, seed):
    """E ≥ 2: at E = 1 the normalisation leaves no tangent direction, the true gradient is 0 and
    fp32 keeps a residual of ~1e-7 of the logit scale, which no normwise tolerance admits."""
    labels = torch.randint(0, k, (b,), generator=gen(seed))
    text = unit(k, e, seed)
    ours, oracle = _with_labels(labels)
    check_op(ours, oracle, [torch.randn(b, e, generator=gen(seed + 1)), text, ref.class_distribution(text)],
             seed=seed)


def test_without_sls_the_objective_is_clipoods_mms_with_hard_labels(torch_path):
    from alignclip import AlignCLIPLoss
    from alignclip.model import VisualOutput

    g = gen(30)
    feats, text = torch.randn(6, 1, 16, generator=g), unit(5, 16, 31)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    terms = AlignCLIPLoss(text, align=False, sls=False, logit_scale=100.0)(VisualOutput(feats, None, None), labels)
    f = torch.nn.functional.normalize(feats[:, 0], dim=-1)
    want = torch.nn.functional.cross_entropy(100.0 * (f @ text.T - 0.3 * text[labels] @ text.T), labels)
    torch.testing.assert_close(terms.total, want, rtol=1e-5, atol=1e-6)
    smoothed = AlignCLIPLoss(text, align=False, logit_scale=100.0)(VisualOutput(feats, None, None), labels)
    assert abs(float(smoothed.total - terms.total)) > 1e-3      # SLS moves target mass: another objective
