"""Bytes moved and FLOPs per op: the floor each kernel is read against.

Counts are lower bounds: every input read once, every output written once, and the FLOPs of
the matrix products the math needs (softmax, norms and elementwise work are not counted). The
H200 figures are the measured peaks SPEC.md quotes: about 4.3 TB/s HBM and 790 TFLOP/s bf16.
"""
from dataclasses import dataclass

H200_BYTES_PER_S = 4.3e12
H200_FLOPS = 790e12


@dataclass(frozen=True)
class Cost:
    bytes: int
    flops: int

    def __add__(self, other):
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def bound_s(self, bytes_per_s=H200_BYTES_PER_S, flops_per_s=H200_FLOPS):
        """Roofline lower bound on time: the slower of moving the bytes and doing the FLOPs."""
        return max(self.bytes / bytes_per_s, self.flops / flops_per_s)

    def as_dict(self):
        return {"bytes": self.bytes, "flops": self.flops, "bound_us": self.bound_s() * 1e6}


def fwd_bwd(cost_fn, *args, **kwargs):
    """Forward plus backward cost of one op: `cost_fn(..., backward=False) + (..., backward=True)`."""
    return cost_fn(*args, **kwargs) + cost_fn(*args, backward=True, **kwargs)


def attention(b, h, n, d, itemsize, *, rows=1, write_dv=False, backward=False, d_rows=True,
              d_dv=True):
    """Forward: q, k, v in; out, LSE, R probe rows (fp32) and, when not a view, dv out.
    Backward: q, k, v, out, dO, LSE, Δ in (plus d(rows), rows and d(dv)); dq, dk, dv out."""
    x = b * h * n * d * itemsize
    stats = b * h * n * 4
    probe = b * h * rows * n * 4
    qk = 2 * b * h * n * n * d
    if not backward:
        return Cost(3 * x + x + stats + probe + (x if write_dv else 0), 2 * qk + 2 * b * h * rows * n * d)
    extra = (2 * probe if d_rows and rows else 0) + (x if d_dv else 0)
    return Cost(5 * x + 2 * stats + extra + 3 * x, 5 * qk)


def token_text_target(b, p, e, itemsize, *, backward=False):
    tokens = b * p * e * itemsize
    if not backward:
        return Cost(tokens + b * e * itemsize + b * p * 4, 4 * b * p * e)
    return Cost(2 * tokens + b * e * itemsize + 2 * b * p * 4, 8 * b * p * e)


def aal_kl(n_layers, b, h, n, *, backward=False):
    attn = n_layers * b * h * n * 4
    target = b * (n - 1) * 4
    if not backward:
        return Cost(attn + target, 0)
    return Cost(2 * attn + 2 * target, 0)


def similarity_align(b, p, e, k, itemsize, *, backward=False, text_grad=False):
    tokens = 2 * b * p * e * itemsize
    text = k * e * itemsize
    gemm = 2 * b * p * k * e
    if not backward:
        return Cost(tokens + text + 3 * b * k * 4, 2 * gemm)
    return Cost(2 * tokens + text + 3 * b * k * 4 + (text if text_grad else 0),
                4 * gemm + (2 * gemm if text_grad else 0))


def sls_mms(b, e, k, itemsize, *, backward=False, text_grad=False):
    feats = b * e * itemsize
    text = k * e * itemsize
    logits = b * k * 4
    gemm = 2 * b * k * e
    if not backward:
        return Cost(feats + text + logits + logits, gemm)      # logits out, target rows in
    return Cost(2 * feats + text + 2 * logits + (text if text_grad else 0),
                gemm + (gemm if text_grad else 0))


def bma(num_params, itemsize=4):
    """One lerp over every parameter: read the average and the model, write the average."""
    return Cost(3 * num_params * itemsize, 3 * num_params)
