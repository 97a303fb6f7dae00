"""The alternatives a benchmark puts side by side, on identical inputs.

Attention providers take one packed QKV projection [B, N, 3, H, D] and return what
`fused_alignclip_attention` returns (out, dv, the CLS row with its gradient) unless said:
- `fused`: `split_qkv` views into `fused_alignclip_attention`, as the model calls it: on CUDA
  the library's per-shape choice between its kernels and the SDPA composite (recorded);
- `fused-triton`: the same with the kernels forced (`ALIGNCLIP_ATTENTION=triton`);
- `sdpa-rows`, `sdpa-rows-flash`, `sdpa-rows-cudnn`, `sdpa-rows-efficient`: the strongest rival
  of equal output, what a strong engineer writes without this library (and the library's own
  PyTorch path): SDPA for `out` (PyTorch's pick of backend, or one pinned), the CLS row as one
  small [B, H, 1, N] fp32 product, `dv` a view, gradients through both by autograd;
- `flex-rows`: FlexAttention (compiled on CUDA) with its log-sum-exp, the CLS row as
  exp(s·q₀kᵀ − lse₀); FlexAttention has no CPU backward, so it runs forward only there;
- `sdpa`: SDPA returning `out` alone (no D-V branch, no CLS row): the floor, not a rival;
- `reference`: the authors' path (a materialised softmax, the CLS row taken from it).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import alignclip_kernels as ak
from alignclip.bma import beta_weight
from alignclip_kernels.attention import _torch_dual_attention, run_path

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
ATTENTION = ["reference", "sdpa", "sdpa-rows", *(f"sdpa-rows-{b}" for b in SDPA_BACKENDS), "flex-rows",
             "fused", "fused-triton"]
RIVALS = ("sdpa-rows", *(f"sdpa-rows-{b}" for b in SDPA_BACKENDS), "flex-rows")


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


def composite_attention(q, k, v, scale=None, return_dv=True, return_cls_attn=True, backend=None):
    """The SDPA composite with `fused_alignclip_attention`'s signature and outputs: the library's
    own PyTorch path, on SDPA's pick of backend or the one pinned."""
    rows = 1 if return_cls_attn else 0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with sdpa_kernel([SDPA_BACKENDS[backend]]) if backend else contextlib.nullcontext():
        out, dv, row_attn = _torch_dual_attention(q, k, v, rows, scale, return_dv)
    return out, dv, (row_attn[:, :, 0] if rows else None)


_FLEX = {}


def flex_attention_rows(q, k, v, scale=None):
    """FlexAttention's out and log-sum-exp; the CLS row rebuilt from them (fp32)."""
    from torch.nn.attention import flex_attention as fa

    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if not torch.is_grad_enabled():   # views of a leaf that asks for gradients: FlexAttention's CPU path refuses them
        q, k, v = q.detach(), k.detach(), v.detach()
    if q.device.type not in _FLEX:
        _FLEX[q.device.type] = torch.compile(fa.flex_attention) if q.is_cuda else fa.flex_attention
    if hasattr(fa, "AuxRequest"):
        out, aux = _FLEX[q.device.type](q, k, v, scale=scale, return_aux=fa.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = _FLEX[q.device.type](q, k, v, scale=scale, return_lse=True)
    with torch.autocast(q.device.type, enabled=False):
        cls = torch.exp(scale * (q[:, :, :1].float() @ k.float().transpose(-1, -2)) - lse[:, :, :1, None].float())
    return out.transpose(1, 2).reshape(b, n, h * d), v.transpose(1, 2).reshape(b, n, h * d), cls[:, :, 0]


def attention_inputs(provider, qkv):
    """(leaves to differentiate, the provider's q, k, v) for one run: views of the packed
    projection, as the model hands them over."""
    leaf = qkv.detach().requires_grad_()
    views = ak.split_qkv(leaf) if provider.startswith("fused") else packed_views(leaf)
    return [leaf], views


def attention_call(provider):
    """The provider as a function of (q, k, v) returning its outputs (a tuple)."""
    if provider == "reference":
        return authors_attention
    if provider == "fused":
        return ak.fused_alignclip_attention
    if provider == "fused-triton":
        def kernels(q, k, v):
            out, dv, rows = run_path("triton", q, k, v, 1, q.shape[-1] ** -0.5, True)
            return out, dv, rows[:, :, 0]
        return kernels
    if provider.startswith("sdpa-rows"):
        backend = provider[len("sdpa-rows-"):] or None
        return lambda q, k, v: composite_attention(q, k, v, backend=backend)
    if provider == "flex-rows":
        return flex_attention_rows
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
