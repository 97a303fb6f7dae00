"""The AAL: aal_kl_loss (G given) and the fused aal_loss (G from the D-V tokens) against the
float64 reference, values and every gradient; degenerate layers, launches, bad input, properties."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import check_op, cls_rows, gen, refusal_test, unit


def _target(b, p, seed, zeros=True):
    target = torch.softmax(torch.randn(b, p, generator=gen(seed)), -1)
    if zeros:
        target[0, : p // 2] = 0.0     # exact zeros: 0·log 0 = 0
    return target


@pytest.mark.parametrize("n_layers,b,h,n", [(5, 3, 2, 24), (1, 1, 1, 2), (2, 2, 3, 50), (5, 1, 12, 197)])
def test_kl_matches_reference(n_layers, b, h, n):
    check_op(ak.aal_kl_loss, ref.aal_kl_loss, [cls_rows(n_layers, b, h, n, 3), _target(b, n - 1, 4)])


@pytest.mark.parametrize("n_layers,b,h,n,e,k", [(5, 3, 2, 24, 40, 5), (2, 2, 3, 50, 33, 7),
                                                (5, 1, 12, 197, 64, 4), (1, 1, 1, 2, 8, 1)])
def test_fused_matches_reference(n_layers, b, h, n, e, k):
    labels = torch.randint(0, k, (b,), generator=gen(5))
    check_op(ak.aal_loss, ref.aal_loss,
             [cls_rows(n_layers, b, h, n, 6), torch.randn(b, n - 1, e, generator=gen(7)), unit(k, e, 8)],
             others=(labels,), kwargs=dict(temperature=0.5))


@pytest.mark.parametrize("seed", range(6))
def test_all_mass_on_cls_stays_finite(seed):
    attn = torch.zeros(2, 2, 2, 6)
    attn[..., 0] = 1.0     # patch attention underflowed to exactly 0: degenerate layers
    attn[1, 1] = torch.softmax(torch.randn(2, 6, generator=gen(seed)), -1)
    target = torch.softmax(torch.randn(2, 5, generator=gen(100 + seed)), -1)
    out = check_op(ak.aal_kl_loss, ref.aal_kl_loss, [attn, target])
    assert torch.isfinite(out[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_16_bit_tokens_on_the_cpu_match_reference(dtype):
    labels = torch.tensor([0, 2, 1])
    cls = cls_rows(3, 3, 2, 30, 9)

    def op(tokens, text, labels):
        return ak.aal_loss(cls, tokens, text, labels)

    def oracle(tokens, text, labels):
        return ref.aal_loss(cls.double(), tokens, text, labels)

    check_op(op, oracle, [torch.randn(3, 29, 32, generator=gen(10)), unit(3, 32, 11)],
             others=(labels,), dtype=dtype)


def test_one_launch_each_way(launches):
    cls = cls_rows(2, 2, 2, 10, 12).requires_grad_()
    tokens = torch.randn(2, 9, 16, requires_grad=True)
    with launches() as fwd:
        loss = ak.aal_loss(cls, tokens, unit(3, 16, 13), torch.tensor([0, 2]))
    with launches() as bwd:
        loss.backward()
    assert fwd.names == ["_aal_fwd_kernel"] and bwd.names == ["_aal_bwd_kernel"]
    target = torch.softmax(torch.randn(2, 9), -1).requires_grad_()
    with launches() as fwd:
        loss = ak.aal_kl_loss(cls, target)
    with launches() as bwd:
        loss.backward()
    assert len(fwd) == 1 and len(bwd) == 1


CLS = cls_rows(2, 2, 2, 6, 0)
TARGET = _target(2, 5, 1, zeros=False)
BAD = {
    "rank": (lambda: ak.aal_kl_loss(CLS[0], TARGET), ValueError, r"cls_attn must have shape \[L, B, H, N\]"),
    "target shape": (lambda: ak.aal_kl_loss(CLS, torch.softmax(torch.randn(2, 6), -1)), ValueError, r"target must have shape \[B, N-1\]"),
    "batch mismatch": (lambda: ak.aal_kl_loss(CLS, TARGET[:1]), ValueError, "target must have shape"),
    "no patches": (lambda: ak.aal_kl_loss(CLS[..., :1], TARGET[:, :0]), ValueError, "N >= 2"),
    "int attn": (lambda: ak.aal_kl_loss(CLS.long(), TARGET), TypeError, "cls_attn must be a floating"),
    "device mix": (lambda: ak.aal_kl_loss(CLS, TARGET.to("meta")), ValueError, "target is on meta"),
    "fused tokens shape": (lambda: ak.aal_loss(CLS, torch.randn(2, 4, 8), unit(3, 8, 0), torch.tensor([0, 1])), ValueError, r"tokens must have shape \[B, N-1, E\]"),
    "fused label range": (lambda: ak.aal_loss(CLS, torch.randn(2, 5, 8), unit(3, 8, 0), torch.tensor([0, 3])), ValueError, "labels must hold class indices"),
    "fused temperature": (lambda: ak.aal_loss(CLS, torch.randn(2, 5, 8), unit(3, 8, 0), torch.tensor([0, 1]), temperature=-1.0), ValueError, "temperature"),
}


test_bad_input_is_refused_by_name = refusal_test(BAD)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(2, 260), st.integers(1, 64),
       st.integers(1, 20), st.integers(0, 2 ** 16))
def test_property_any_shape(n_layers, b, h, n, e, k, seed):
    labels = torch.randint(0, k, (b,), generator=gen(seed))
    check_op(ak.aal_loss, ref.aal_loss,
             [cls_rows(n_layers, b, h, n, seed), torch.randn(b, n - 1, e, generator=gen(seed + 1)),
              unit(k, e, seed)], others=(labels,), seed=seed)
