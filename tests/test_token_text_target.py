"""token_text_target: the AAL's target G, against the float64 reference (values and the
gradients of tokens and text), launches, bad input and properties."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import check_op, gen, patch_tokens, refusal_test, unit


@pytest.mark.parametrize("b,p,e,k,temp", [(3, 23, 40, 5, 1.0), (1, 1, 8, 1, 0.07),
                                          (2, 49, 33, 7, 0.5), (1, 196, 64, 4, 1.0)])
def test_matches_reference(b, p, e, k, temp):
    tokens = torch.randn(b, p, e, generator=gen(0))
    tokens[0, 0] = 0.0      # a zero-norm token: eps as F.normalize
    labels = torch.randint(0, k, (b,), generator=gen(1))
    out = check_op(ak.token_text_target, ref.token_text_target, [tokens, unit(k, e, 2)],
                   others=(labels,), kwargs=dict(temperature=temp))
    torch.testing.assert_close(out[0].sum(1), torch.ones(b))


def test_target_that_underflows_to_exact_zeros_matches_reference():
    tokens = torch.randn(2, 30, 16, generator=gen(23))
    labels = torch.tensor([0, 2])
    out = check_op(ak.token_text_target, ref.token_text_target, [tokens, unit(3, 16, 24)],
                   others=(labels,), kwargs=dict(temperature=1e-3))
    assert (out[0] == 0).any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_on_the_cpu_match_reference(dtype):
    tokens = torch.randn(3, 40, 32, generator=gen(3))
    labels = torch.tensor([0, 1, 1])
    out = check_op(ak.token_text_target, ref.token_text_target, [tokens, unit(2, 32, 4)],
                   others=(labels,), dtype=dtype)
    assert out[0].dtype == torch.float32


def test_one_launch_each_way(launches):
    tokens = torch.randn(2, 9, 16, requires_grad=True)
    text = unit(3, 16, 5).requires_grad_()
    with launches() as fwd:
        g = ak.token_text_target(tokens, text, torch.tensor([0, 2]))
    with launches() as bwd:
        g.square().sum().backward()
    assert fwd.names == ["_target_fwd_kernel"] and bwd.names == ["_target_bwd_kernel"]


def test_float64_inputs_keep_float64():
    tokens = torch.randn(2, 7, 16, dtype=torch.float64, generator=gen(28))
    assert ak.token_text_target(tokens, unit(3, 16, 29).double(), torch.tensor([0, 2])).dtype == torch.float64


B, P, E, K = 2, 5, 8, 3
TOK = torch.randn(B, P, E)
TEXT = unit(K, E, 0)
LABELS = torch.tensor([0, 2])
BAD = {
    "tokens rank": (lambda: ak.token_text_target(TOK[0], TEXT, LABELS), ValueError, r"tokens must have shape \[B, P, E\]"),
    "text rank": (lambda: ak.token_text_target(TOK, TEXT[None], LABELS), ValueError, r"text must have shape \[K, E\]"),
    "width": (lambda: ak.token_text_target(TOK, TEXT[:, :4], LABELS), ValueError, "text: width E"),
    "int tokens": (lambda: ak.token_text_target(TOK.long(), TEXT, LABELS), TypeError, "tokens must be a floating"),
    "dtype mix": (lambda: ak.token_text_target(TOK, TEXT.half(), LABELS), TypeError, "text has dtype"),
    "device mix": (lambda: ak.token_text_target(TOK.to("meta"), TEXT, LABELS), ValueError, "text is on cpu but tokens is on meta"),
    "float labels": (lambda: ak.token_text_target(TOK, TEXT, LABELS.float()), TypeError, "labels must be an integer"),
    "labels list": (lambda: ak.token_text_target(TOK, TEXT, [0, 1]), TypeError, "labels must be an int64 torch.Tensor"),
    "label range": (lambda: ak.token_text_target(TOK, TEXT, torch.tensor([0, 3])), ValueError, r"labels must hold class indices in \[0, 3\)"),
    "negative label": (lambda: ak.token_text_target(TOK, TEXT, torch.tensor([-1, 0])), ValueError, "labels must hold class indices"),
    "labels length": (lambda: ak.token_text_target(TOK, TEXT, LABELS[:1]), ValueError, r"labels must have shape \[B\]"),
    "temperature 0": (lambda: ak.token_text_target(TOK, TEXT, LABELS, temperature=0.0), ValueError, "temperature must be finite and > 0"),
    "temperature inf": (lambda: ak.token_text_target(TOK, TEXT, LABELS, temperature=float("inf")), ValueError, "temperature"),
    "temperature nan": (lambda: ak.token_text_target(TOK, TEXT, LABELS, temperature=float("nan")), ValueError, "temperature"),
    "temperature str": (lambda: ak.token_text_target(TOK, TEXT, LABELS, temperature="1"), TypeError, "temperature must be a real number"),
}


test_bad_input_is_refused_by_name = refusal_test(BAD)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(1, 300), st.integers(1, 96), st.integers(1, 40), st.booleans(),
       st.integers(0, 2 ** 16))
def test_property_any_shape_and_strided_tokens(b, p, e, k, strided, seed):
    g = gen(seed)
    tokens = patch_tokens(g, b, p=p, e=e, strided=strided)
    labels = torch.randint(0, k, (b,), generator=g)
    check_op(ak.token_text_target, ref.token_text_target, [tokens, unit(k, e, seed)],
             others=(labels,), seed=seed)
