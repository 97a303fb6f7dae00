"""Plain PyTorch oracle for every op of docs/contract.md, sections 1-5.

Written for clarity, not speed: full attention matrices and `[B, P, K]` similarity tensors are
materialised. Tests run these in float64 and hold the Triton kernels and the PyTorch fallback
to them, values and gradients. Statistics are computed in at least float32 whatever the input
dtype; a float64 input stays float64 all the way through.

Two choices at the edges (the fused kernels make the same ones):
- `aal_kl_loss`: a layer whose patch attention sums below float32 tiny (the CLS row put all its
  mass on the CLS key) is degenerate: its renormalised row is taken as 0, with zero gradient,
  rather than 0/0 (or a gradient of order 1/tiny that overflows fp32).
- `aal_kl_loss`: the gradient of G·log G at G = 0 is taken as 0 (the 0·log 0 = 0 convention
  extended to the derivative), so a target with exact zeros has a finite gradient.
"""
import torch
import torch.nn.functional as F

from .paper import LABEL_EPSILON, LOGIT_SCALE, MARGIN_ALPHA, SMOOTHING, TEMPERATURE

TINY = torch.finfo(torch.float32).tiny
NORM_EPS = 1e-12


def _stat_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def merge_heads(x):
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def dual_attention(q, k, v, *, rows=1, scale=None, return_dv=True):
    """Q-K-V attention, D-V branch and the softmax rows of the first `rows` queries."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    sd = _stat_dtype(q.dtype)
    scores = (q.to(sd) @ k.to(sd).transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    out = merge_heads((probs @ v.to(sd)).to(q.dtype))
    dv = merge_heads(v) if return_dv else None
    row_attn = probs[:, :, :rows] if rows > 0 else None
    return out, dv, row_attn


def fused_alignclip_attention(q, k, v, *, scale=None, return_dv=True, return_cls_attn=True):
    out, dv, rows = dual_attention(q, k, v, rows=1 if return_cls_attn else 0, scale=scale,
                                   return_dv=return_dv)
    return out, dv, rows[:, :, 0] if rows is not None else None


def token_text_target(tokens, text, labels, *, temperature=TEMPERATURE):
    """G[b, n] = softmax_n(cos(tokens[b, n], text[labels[b]]) / temperature)."""
    sd = _stat_dtype(tokens.dtype)
    u = F.normalize(tokens.to(sd), dim=-1, eps=NORM_EPS)
    t = F.normalize(text.to(sd), dim=-1, eps=NORM_EPS)[labels]
    cos = (u * t[:, None, :]).sum(-1)
    return torch.softmax(cos / temperature, dim=1)


def _xlogx(x):
    """x·log x with 0·log 0 = 0 and a zero derivative at x = 0."""
    return torch.where(x > 0, x * x.clamp_min(TINY).log(), torch.zeros_like(x))


def aal_kl_loss(cls_attn, target):
    """KL(G || A) batchmean, A the layer-mean of the L1-renormalised head-mean patch attention."""
    sd = _stat_dtype(cls_attn.dtype)
    m = cls_attn.to(sd)[..., 1:].mean(dim=2)                     # [L, B, P]
    total = m.sum(dim=-1, keepdim=True)
    a = torch.where(total >= TINY, m / total.clamp_min(TINY), torch.zeros_like(m))
    attn = a.mean(dim=0).clamp_min(TINY)                         # [B, P]
    g = target.to(sd)
    return (_xlogx(g) - g * attn.log()).sum() / g.shape[0]


def aal_loss(cls_attn, tokens, text, labels, *, temperature=TEMPERATURE):
    """The AAL with its target from the D-V tokens: aal_kl_loss(cls_attn, token_text_target(...))."""
    return aal_kl_loss(cls_attn, token_text_target(tokens, text, labels, temperature=temperature))


def similarity_align_loss(tokens, tokens_dv, text):
    """KL(Q || Pr) batchmean, Pr and Q the patch-axis softmaxes of both paths' cosine maps."""
    sd = _stat_dtype(tokens.dtype)
    t = F.normalize(text.to(sd), dim=-1, eps=NORM_EPS)
    s = F.normalize(tokens.to(sd), dim=-1, eps=NORM_EPS) @ t.T          # [B, P, K]
    s_dv = F.normalize(tokens_dv.to(sd), dim=-1, eps=NORM_EPS) @ t.T
    log_p = torch.log_softmax(s, dim=1)
    log_q = torch.log_softmax(s_dv, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum() / tokens.shape[0]


def class_distribution(text, *, smoothing=SMOOTHING):
    sd = _stat_dtype(text.dtype)
    t = text.to(sd)
    return torch.softmax(t @ t.T * smoothing, dim=1)


def sls_mms_loss(image_features, text, labels, class_dist, *, alpha=MARGIN_ALPHA,
                 logit_scale=LOGIT_SCALE, epsilon=LABEL_EPSILON):
    """Soft-target cross-entropy over CLIPood's margin logits; returns (loss, logits)."""
    sd = _stat_dtype(image_features.dtype)
    f = F.normalize(image_features.to(sd), dim=-1, eps=NORM_EPS)
    t = text.to(sd)
    logits = logit_scale * (f @ t.T - alpha * (t[labels] @ t.T))
    target = class_dist.to(sd)[labels].clone()
    target[torch.arange(labels.shape[0], device=labels.device), labels] = epsilon
    loss = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return loss, logits
