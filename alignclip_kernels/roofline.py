"""Necessary work per op and phase: the floor the work counter and the benchmarks read kernels against.

A `Cost` holds
- `bytes`: compulsory HBM traffic: every input read once, every output written once, plus the
  per-row state a backward cannot do without (named per op below); scratch an implementation
  chooses to keep beyond that is not counted here, it shows up in the counter's unique bytes;
- `macs`: the multiply-adds of the op's matrix and matrix-vector products, unpadded (softmax,
  norms and other elementwise work are not counted, on either side of the counter's ratio).

The H200 peaks are the measured ones the GPU machine's documentation gives: about 4.3 TB/s of
HBM copy bandwidth and 790 TFLOP/s of dense bf16 tensor-core math; CUDA-core fp32 FMA math is
taken at the datasheet's 67 TFLOP/s.
"""
from dataclasses import dataclass

H200_BYTES_PER_S = 4.3e12
H200_TENSOR_FLOPS = 790e12
H200_FMA_FLOPS = 67e12
F32 = 4


@dataclass(frozen=True)
class Cost:
    bytes: int
    macs: int

    @property
    def flops(self):
        return 2 * self.macs

    def __add__(self, other):
        return Cost(self.bytes + other.bytes, self.macs + other.macs)

    def bound_s(self, bytes_per_s=H200_BYTES_PER_S, flops_per_s=H200_TENSOR_FLOPS):
        """Roofline lower bound on time: the slower of moving the bytes and doing the FLOPs."""
        return max(self.bytes / bytes_per_s, self.flops / flops_per_s)

    def as_dict(self):
        return {"bytes": self.bytes, "macs": self.macs, "flops": self.flops,
                "bound_us": self.bound_s() * 1e6}


def fwd_bwd(cost_fn, *args, **kwargs):
    """Forward plus backward cost of one op: `cost_fn(..., backward=False) + (..., backward=True)`."""
    return cost_fn(*args, **kwargs) + cost_fn(*args, backward=True, **kwargs)


def attention(b, h, n, d, itemsize, *, rows=1, write_dv=False, backward=False, d_rows=True,
              d_dv=True):
    """Forward: q, k, v in; out, the LSE (the backward's state) and R probe rows (fp32) out, dv
    out only when it cannot be a view. 2·N²·D MACs per head (QKᵀ, PV).
    Backward: q, k, v, out, dO, LSE in (plus d(rows) and the rows, d(dv)); dq, dk, dv out.
    5·N²·D MACs per head (QKᵀ, Pᵀ dO, dO Vᵀ, dSᵀ Q, dS K) plus 2·R·N·D for the probe rows' dA."""
    x = b * h * n * d * itemsize
    lse = b * h * n * F32
    probe = b * h * rows * n * F32
    heads = b * h
    if not backward:
        return Cost(3 * x + x + lse + probe + (x if write_dv else 0), heads * 2 * n * n * d)
    extra = (2 * probe if d_rows and rows else 0) + (x if d_dv else 0)
    macs = heads * (5 * n * n * d + (2 * rows * n * d if d_rows and rows else 0))
    return Cost(5 * x + lse + extra + 3 * x, macs)


def attention_composite(b, h, n, d, itemsize, *, rows=1, backward=False):
    """The SDPA composite's necessary work (the strongest rival of equal output: SDPA for out,
    the R probe rows as a separate product, dv a view), at least: SDPA's own compulsory
    traffic, plus k read again by the rows' product forward and backward, and the rows'
    gradients into dq and dk as separate tensors added into SDPA's (autograd's sum reads both,
    writes one; dq's slice is first scattered into a full-size tensor). Products as ours."""
    x = b * h * n * d * itemsize
    own = attention(b, h, n, d, itemsize, rows=rows, backward=backward, d_rows=rows > 0)
    if not rows:
        return own
    if not backward:
        return Cost(own.bytes + x, own.macs)
    return Cost(own.bytes + x + 3 * x + 4 * x, own.macs)


def token_text_target(b, p, e, itemsize, *, k=None, backward=False, text_grad=False):
    """Forward: tokens, the labels' text rows (min(B, K) of them) in; G out. B·P·E MACs (û·t̂).
    Backward: tokens, text rows, G, dG in; d tokens (and d text) out. B·P·E MACs for d text only
    (the cosines can be kept from the forward)."""
    tokens = b * p * e * itemsize
    rows = min(b, k or b) * e * itemsize
    g = b * p * F32
    if not backward:
        return Cost(tokens + rows + b * 8 + g, b * p * e)
    return Cost(tokens + rows + b * 8 + 2 * g + tokens + (rows if text_grad else 0),
                b * p * e if text_grad else 0)


def aal_kl(n_layers, b, h, n, *, backward=False, itemsize=F32):
    """Forward: cls_attn, G in; the head-mean attention [L, B, P] out (the backward's state, 1/H
    of cls_attn). Backward: head means, G in; d cls_attn, d G out. No products."""
    attn = n_layers * b * h * n * itemsize
    means = n_layers * b * (n - 1) * F32
    g = b * (n - 1) * F32
    if not backward:
        return Cost(attn + g + means, 0)
    return Cost(means + g + attn + g, 0)


def aal(n_layers, b, h, n, e, itemsize, *, k=None, backward=False, text_grad=False):
    """The fused AAL: aal_kl's traffic with G's from tokens instead of G itself."""
    kl = aal_kl(n_layers, b, h, n, backward=backward)
    target = token_text_target(b, n - 1, e, itemsize, k=k, backward=backward, text_grad=text_grad)
    g = b * (n - 1) * F32
    if not backward:
        return Cost(kl.bytes - g + target.bytes - g, target.macs)     # G neither read nor written
    return Cost(kl.bytes - 2 * g + target.bytes - 2 * g, target.macs)


def similarity_align(b, p, e, k, itemsize, *, backward=False, text_grad=False):
    """Forward: both paths' tokens and the text in; the per-(image, class) (l_p, l_q, KL) out
    (the backward's state). 2·B·P·K·E MACs (S, S_dv).
    Backward: tokens, text, that state in; d tokens of both paths (and d text) out.
    4·B·P·K·E MACs: S, S_dv again (nothing [B, P, K] is kept) and dû, dû_dv; 2·B·P·K·E more
    for d text."""
    tokens = 2 * b * p * e * itemsize
    text = k * e * itemsize
    stats = 3 * b * k * F32
    gemm = b * p * k * e
    if not backward:
        return Cost(tokens + text + stats, 2 * gemm)
    return Cost(2 * tokens + text + stats + (text if text_grad else 0),
                4 * gemm + (2 * gemm if text_grad else 0))


def sls_mms(b, e, k, itemsize, *, backward=False, text_grad=False):
    """Forward: features, text, labels and the labels' class_dist rows in; logits out, plus the
    per-image (logsumexp, Σ target) the backward needs. B·K·E MACs.
    Backward: features, text, class_dist rows, logits and that state in; d features (and d text)
    out. B·K·E MACs, B·K·E more for d text."""
    feats = b * e * itemsize
    text = k * e * itemsize
    logits = b * k * F32
    cd_rows = min(b, k) * k * F32
    state = 2 * b * F32
    if not backward:
        return Cost(feats + text + b * 8 + cd_rows + logits + state, b * k * e)
    return Cost(feats + text + b * 8 + cd_rows + logits + state + b * e * F32
                + (text if text_grad else 0), b * k * e * (2 if text_grad else 1))


def bma(num_params, itemsize=4):
    """One lerp over every parameter: read the average and the model, write the average."""
    return Cost(3 * num_params * itemsize, 0)
