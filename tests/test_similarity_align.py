"""similarity_align_loss against the float64 reference: values and the gradients of both paths'
tokens and the text; class tails on tensor and CUDA cores, strides, launches, bad input, properties."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from utils import check_op, gen, patch_tokens, refusal_test, unit


@pytest.mark.parametrize("b,p,e,k", [(3, 23, 40, 5), (1, 1, 16, 1), (2, 70, 50, 37), (1, 196, 64, 17),
                                     (2, 33, 32, 16), (4, 20, 24, 40)])
def test_matches_reference(b, p, e, k):
    tokens = torch.randn(b, p, e, generator=gen(6))
    tokens[-1, -1] = 0.0
    check_op(ak.similarity_align_loss, ref.similarity_align_loss,
             [tokens, torch.randn(b, p, e, generator=gen(7)), torch.randn(k, e, generator=gen(8))])


def test_different_strides_per_path():
    base = torch.randn(2, 11, 3, 24, generator=gen(25))
    tokens = base[:, :, 0]                                                  # rows 3·E apart
    tokens_dv = torch.randn(2, 24, 11, generator=gen(26)).transpose(1, 2)   # E-major
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens_dv, unit(4, 24, 27)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_on_the_cpu_match_reference(dtype):
    check_op(ak.similarity_align_loss, ref.similarity_align_loss,
             [torch.randn(2, 30, 32, generator=gen(1)), torch.randn(2, 30, 32, generator=gen(2)),
              unit(20, 32, 3)], dtype=dtype)


def test_one_launch_each_way(launches):
    tokens = torch.randn(2, 9, 16, requires_grad=True)
    tokens_dv = torch.randn(2, 9, 16, requires_grad=True)
    with launches() as fwd:
        loss = ak.similarity_align_loss(tokens, tokens_dv, unit(3, 16, 1))
    with launches() as bwd:
        loss.backward()
    assert fwd.names == ["_sim_fwd_kernel"] and bwd.names == ["_sim_bwd_kernel"]


def test_float64_inputs_keep_float64():
    tokens = torch.randn(2, 7, 16, dtype=torch.float64, generator=gen(28))
    text = unit(3, 16, 29).double()
    got = ak.similarity_align_loss(tokens, tokens.flip(1), text)
    assert got.dtype == torch.float64
    assert got.item() == ref.similarity_align_loss(tokens, tokens.flip(1), text).item()


TOK = torch.randn(2, 5, 8)
TEXT = unit(3, 8, 0)
BAD = {
    "tokens_dv shape": (lambda: ak.similarity_align_loss(TOK, TOK[:, :3], TEXT), ValueError, "tokens_dv must have the shape of tokens"),
    "text width": (lambda: ak.similarity_align_loss(TOK, TOK, TEXT[:, :4]), ValueError, "text: width E"),
    "no classes": (lambda: ak.similarity_align_loss(TOK, TOK, TEXT[:0]), ValueError, "must be non-empty"),
    "dtype mix": (lambda: ak.similarity_align_loss(TOK, TOK.double(), TEXT), TypeError, "tokens_dv has dtype"),
    "rank": (lambda: ak.similarity_align_loss(TOK[0], TOK[0], TEXT), ValueError, "tokens must have shape"),
    "not a tensor": (lambda: ak.similarity_align_loss(TOK, TOK.tolist(), TEXT), TypeError, "tokens_dv must be a torch.Tensor"),
}


test_bad_input_is_refused_by_name = refusal_test(BAD)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(1, 200), st.integers(1, 96), st.integers(1, 40), st.booleans(),
       st.integers(0, 2 ** 16))
def test_property_any_shape_and_strided_tokens(b, p, e, k, strided, seed):
    tokens, tokens_dv = patch_tokens(gen(seed), 2, b, p=p, e=e, strided=strided).unbind(0)
    # The KL sums O(1) terms that cancel exactly when K = 1 or S = S_dv: the kernel's base-2
    # log-sum-exp leaves up to a few fp32 ulps of those terms (1.2e-7 seen), not of the result.
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens_dv, unit(k, e, seed)],
             seed=seed, tolerance=dict(rtol=1e-5, atol=1e-6))
