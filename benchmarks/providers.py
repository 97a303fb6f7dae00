"""The alternatives a benchmark puts side by side, on identical inputs."""
import torch
import torch.nn.functional as F

from alignclip.bma import beta_weight


def packed_qkv(b, h, n, d, dtype, device, requires_grad=True, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, generator=gen)
    return qkv.requires_grad_(requires_grad)


def qkv_views(qkv):
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def authors_attention(q, k, v, scale=None, return_dv=True, return_cls_attn=True):
    """The authors' path: nn.MultiheadAttention(need_weights=True)-style materialised softmax
    in the input dtype, a separate D-V pass over v, the CLS row taken from the weights."""
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, h * d)
    dv = v.transpose(1, 2).reshape(b, n, h * d).clone() if return_dv else None
    cls = weights[:, :, 0].float() if return_cls_attn else None
    return out, dv, cls


def sdpa_attention(q, k, v):
    """The speed floor: PyTorch SDPA (flash backend where it applies), `out` only."""
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


def bma_loop(averaged, params, step, total, beta, weight_sum):
    """The per-tensor Python loop the fused BMA replaces (two kernels per tensor)."""
    w = beta_weight(step, total, beta)
    ratio = w / weight_sum
    with torch.no_grad():
        for a, p in zip(averaged, params):
            a.mul_(1.0 / (1.0 + ratio)).add_(p, alpha=ratio / (1.0 + ratio))
    return weight_sum + w


def mms_loss(image_features, text, labels, alpha=0.3, logit_scale=100.0):
    """CLIPood's margin metric softmax with hard labels, in plain PyTorch."""
    f = F.normalize(image_features.float(), dim=-1)
    logits = logit_scale * (f @ text.T - alpha * (text[labels] @ text.T))
    return F.cross_entropy(logits, labels)
