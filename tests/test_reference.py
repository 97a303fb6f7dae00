"""The oracle itself, held to PyTorch's own primitives."""
import pytest
import torch
import torch.nn.functional as F

from alignclip_kernels import reference as ref


def _mha_qkv(mha, x):
    b, n, c = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, c // h)
    return [qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3)]


@pytest.mark.parametrize("average", [True, False])
def test_attention_matches_multihead_attention(average):
    torch.manual_seed(0)
    b, n, c, h = 2, 11, 32, 4
    mha = torch.nn.MultiheadAttention(c, h, batch_first=True, dtype=torch.float64)
    x = torch.randn(b, n, c, dtype=torch.float64)
    want, weights = mha(x, x, x, need_weights=True, average_attn_weights=average)
    q, k, v = _mha_qkv(mha, x)
    out, dv, rows = ref.dual_attention(q, k, v, rows=n)
    torch.testing.assert_close(mha.out_proj(out), want)
    torch.testing.assert_close(rows.mean(1) if average else rows, weights)
    cls = ref.fused_alignclip_attention(q, k, v)[2]
    torch.testing.assert_close(cls.mean(1) if average else cls, weights[..., 0, :])
    torch.testing.assert_close(dv, v.permute(0, 2, 1, 3).reshape(b, n, c))


def test_attention_matches_sdpa_and_rows_sum_to_one():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 3, 9, 16, dtype=torch.float64).unbind(0)
    out, _, rows = ref.dual_attention(q, k, v, rows=3, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(2, 9, 48)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 3, 3, dtype=torch.float64))
    assert ref.dual_attention(q, k, v, rows=0, return_dv=False)[1:] == (None, None)


def test_aal_matches_kl_div():
    torch.manual_seed(2)
    attn = torch.softmax(torch.randn(3, 4, 2, 10, dtype=torch.float64), -1).requires_grad_()
    g = torch.softmax(torch.randn(4, 9, dtype=torch.float64), -1)
    m = attn[..., 1:].mean(2)
    a = (m / m.sum(-1, keepdim=True)).mean(0)
    want = F.kl_div(a.log(), g, reduction="batchmean")
    got = ref.aal_kl_loss(attn, g)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, attn)[0], torch.autograd.grad(want, attn)[0])


def test_aal_zero_target_entries_have_finite_gradient():
    attn = torch.softmax(torch.randn(1, 2, 2, 6, dtype=torch.float64), -1)
    g = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [1.0, 0, 0, 0, 0]], dtype=torch.float64,
                     requires_grad=True)
    loss = ref.aal_kl_loss(attn, g)
    torch.testing.assert_close(loss, F.kl_div((attn[..., 1:].mean(2) / attn[..., 1:].mean(2).sum(
        -1, keepdim=True)).mean(0).log(), g.detach(), reduction="batchmean"))
    assert torch.isfinite(torch.autograd.grad(loss, g)[0]).all()


def test_similarity_align_matches_kl_div():
    torch.manual_seed(3)
    tok, tok_dv = torch.randn(2, 3, 7, 8, dtype=torch.float64).unbind(0)
    text = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    s = F.cosine_similarity(tok[:, :, None], text[None, None], dim=-1)
    s_dv = F.cosine_similarity(tok_dv[:, :, None], text[None, None], dim=-1)
    want = F.kl_div(torch.softmax(s, 1).log(), torch.softmax(s_dv, 1), reduction="batchmean")
    torch.testing.assert_close(ref.similarity_align_loss(tok, tok_dv, text), want)


def test_token_text_target_is_softmax_of_cosines():
    torch.manual_seed(4)
    tok = torch.randn(2, 6, 8, dtype=torch.float64)
    text = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    labels = torch.tensor([2, 0])
    cos = F.cosine_similarity(tok, text[labels][:, None], dim=-1)
    torch.testing.assert_close(ref.token_text_target(tok, text, labels, temperature=0.5),
                               torch.softmax(cos / 0.5, dim=1))


def test_sls_mms_hard_label_limit_is_cross_entropy():
    torch.manual_seed(5)
    f = torch.randn(6, 8, dtype=torch.float64)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    dist = torch.zeros(4, 4, dtype=torch.float64)
    loss, logits = ref.sls_mms_loss(f, text, labels, dist, alpha=0.0, logit_scale=100.0, epsilon=1.0)
    want_logits = 100.0 * F.normalize(f, dim=-1) @ text.T
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, F.cross_entropy(want_logits, labels))


def test_sls_mms_margin_and_soft_target():
    torch.manual_seed(6)
    f = torch.randn(3, 8, dtype=torch.float64)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    labels = torch.tensor([3, 0, 3])
    dist = ref.class_distribution(text, smoothing=35.0)
    torch.testing.assert_close(dist.sum(1), torch.ones(4, dtype=torch.float64))
    loss, logits = ref.sls_mms_loss(f, text, labels, dist, alpha=0.3, logit_scale=10.0, epsilon=0.9)
    margin = 10.0 * (F.normalize(f, dim=-1) @ text.T - 0.3 * text[labels] @ text.T)
    torch.testing.assert_close(logits, margin)
    target = dist[labels].clone()
    target[torch.arange(3), labels] = 0.9
    want = sum(F.cross_entropy(margin, torch.full((3,), c), reduction="none") * target[:, c]
               for c in range(4)).mean()
    torch.testing.assert_close(loss, want)
