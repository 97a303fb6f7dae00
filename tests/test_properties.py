"""Property tests (hypothesis) over shapes and strides against the float64 references under
the interpreter. The example budget is kept CI-sized (interpreted kernels are slow)."""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignclip_kernels as ak
from alignclip_kernels import reference as ref
from conftest import check_op

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def attention_case(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 300))
    d = draw(st.sampled_from([32, 64, 80, 128]))
    rows = draw(st.integers(0, min(n, 4)))
    layout = draw(st.sampled_from(["packed", "separate", "bnhd"]))
    return b, h, n, d, rows, layout, draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(attention_case())
def test_attention_matches_reference(case):
    b, h, n, d, rows, layout, seed = case
    gen = torch.Generator().manual_seed(seed)
    if layout == "packed":
        floats = [torch.randn(b, n, 3, h, d, generator=gen)]
        views = lambda xs: [xs[0][:, :, i].transpose(1, 2) for i in range(3)]  # noqa: E731
    elif layout == "bnhd":
        floats = [torch.randn(b, n, h, d, generator=gen) for _ in range(3)]
        views = lambda xs: [x.transpose(1, 2) for x in xs]  # noqa: E731
    else:
        floats = [torch.randn(b, h, n, d, generator=gen) for _ in range(3)]
        views = None
    check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views,
             kwargs=dict(rows=rows), seed=seed)


@st.composite
def loss_case(draw):
    return (draw(st.integers(1, 4)), draw(st.integers(1, 300)), draw(st.integers(1, 96)),
            draw(st.integers(1, 40)), draw(st.booleans()), draw(st.integers(0, 2 ** 16)))


@SETTINGS
@given(loss_case())
def test_losses_match_reference(case):
    b, p, e, k, strided, seed = case
    gen = torch.Generator().manual_seed(seed)
    # strided: the patch tokens as a view that skips the CLS row of [B, P+1, E]
    full = torch.randn(2, b, p + 1, e, generator=gen)
    tokens, tokens_dv = (full[:, :, 1:] if strided else full[:, :, :p]).unbind(0)
    text = F.normalize(torch.randn(k, e, generator=gen), dim=-1)
    labels = torch.randint(0, k, (b,), generator=gen)
    check_op(ak.token_text_target, ref.token_text_target, [tokens_dv, text], others=(labels,), seed=seed)
    check_op(ak.similarity_align_loss, ref.similarity_align_loss, [tokens, tokens_dv, text], seed=seed)
    dist = ref.class_distribution(text)
    check_op(lambda f, t, c: ak.sls_mms_loss(f, t, labels, c),
             lambda f, t, c: ref.sls_mms_loss(f, t, labels, c), [tokens[:, 0], text, dist], seed=seed)
    cls = torch.softmax(torch.randn(2, b, 3, p + 1, generator=gen) * 3, -1)
    check_op(ak.aal_kl_loss, ref.aal_kl_loss, [cls, torch.softmax(torch.randn(b, p, generator=gen), -1)],
             seed=seed)
