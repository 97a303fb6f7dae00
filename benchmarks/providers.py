"""The alternatives a benchmark puts side by side, on identical inputs.

Attention providers take one packed QKV projection [B, N, 3, H, D] and its leaf copies:
- `fused`: `split_qkv` views into `fused_alignclip_attention` (out, the zero-copy D-V view, the
  CLS row; the gradient comes back as one packed buffer);
- `fused-leaf`: the same op on separate contiguous q/k/v (dv is written);
- `sdpa`: PyTorch SDPA on the leaf q/k/v with the backend it picks (reported); `sdpa-flash`,
  `sdpa-cudnn`, `sdpa-efficient` pin one backend; `sdpa-packed` runs on views of the packed
  buffer, as open_clip's attention does. SDPA returns `out` only: no D-V branch, no CLS row;
- `reference`: the authors' path (a materialised softmax, the CLS row taken from it).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import alignclip_kernels as ak
from alignclip.bma import beta_weight

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
ATTENTION = ["reference", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-packed",
             "fused", "fused-leaf"]


def packed_qkv(b, h, n, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(b, n, 3, h, d, device=device, dtype=dtype, generator=gen)


def packed_views(qkv):
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


def _sdpa(q, k, v):
    b, h, n, d = q.shape
    return (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d),)


def attention_inputs(provider, qkv):
    """(leaves to differentiate, the provider's q, k, v) for one run."""
    if provider in ("fused", "sdpa-packed", "reference"):
        leaf = qkv.detach().requires_grad_()
        views = ak.split_qkv(leaf) if provider == "fused" else packed_views(leaf)
        return [leaf], views
    leaves = [t.detach().contiguous().requires_grad_() for t in packed_views(qkv)]
    return leaves, leaves


def attention_call(provider):
    """The provider as a function of (q, k, v) returning its outputs (a tuple)."""
    if provider == "reference":
        return authors_attention
    if provider in ("fused", "fused-leaf"):
        return ak.fused_alignclip_attention
    if provider in SDPA_BACKENDS:
        backend = SDPA_BACKENDS[provider]

        def pinned(q, k, v):
            with sdpa_kernel([backend]):
                return _sdpa(q, k, v)
        return pinned
    return _sdpa


def sdpa_backend_used(q, k, v):
    """The SDPA backend PyTorch picks for these inputs, read off the kernels it launches."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    with profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, k, v)
    names = " ".join(e.name.lower() for e in prof.events())
    for tag, backend in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"),
                         ("mem_eff", "efficient"), ("fmha", "efficient")):
        if tag in names:
            return backend
    return "math"


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
