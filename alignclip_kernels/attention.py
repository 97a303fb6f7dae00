r"""Dual-branch attention: the Q-K-V output, the D-V branch and exact softmax probe rows.

For q, k, v of shape [B, H, N, D] and s = scale (default D^-1/2):

    P        = softmax(s · q kᵀ)                    fp32 statistics; never stored
    out      = merge_heads(P v)                     [B, N, H·D]
    dv       = merge_heads(v)                       [B, N, H·D]   the D-V branch (D = identity)
    row_attn = P[:, :, :R]                          [B, H, R, N] fp32 (R = 1: the CLS row)

Forward, one launch over (query blocks, B·H): FlashAttention's online softmax in base 2. Rows
come in BLOCK_M blocks plus 16-row tail programs, keys in BLOCK_N blocks plus 16-key tail
blocks, so N = 197 runs as 208 × 208 rather than 256 × 256. A program holding probe rows
(< R) stores their raw scores while it goes and rescales them with the final log-sum-exp at the
end: no second QKᵀ pass. `dv` is a strided view of v when v's heads sit side by side (a packed
QKV projection), else the launch copies it.

Backward, three launches. With dP = dO vᵀ, Δ_i = rowsum(dO_i ∘ O_i) + Σ_j P_ij dA_ij
(dA = d row_attn, rows < R only) and dS = P ∘ (dP − Δ):

    dV = Pᵀ dO + d(dv),   dK = s (dSᵀ q + Σ_{i<R} (P_i ∘ dA_i)ᵀ q_i),   dQ = s (dS k + (P ∘ dA) k)

1. preprocess: Δ per row, and the fp32 dQ accumulator zeroed;
2. one program per key block (BLOCK_N, plus 16-key tails) walking the query blocks: the five
   products QKᵀ, Pᵀ dO, dO Vᵀ, dSᵀ Q and dS K, dQ added into the fp32 accumulator atomically;
   the probe rows' extra dA term is a rank-R update after the loop, so the loop body is the
   same with and without d(row_attn);
3. dQ: the accumulator scaled and cast into its output (the probe rows' dA term added there).

When q, k, v are views of one packed [B, N, 3, H, D] buffer (`split_qkv`), dq, dk and dv are
written into one packed gradient buffer that `split_qkv` hands back as the gradient of the
projection, and d(dv) is folded into the dV the kernel writes: no zero fills, slice copies or
adds. On CUDA, tiles are autotuned per (N bucket, D, dtype, R > 0); `ALIGNCLIP_AUTOTUNE=0` pins
the static defaults. Under `torch.compile` the op is the custom op `alignclip::dual_attention`,
which writes dv and returns separate gradients (custom ops may not alias their inputs).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._runtime import (
    HAS_TRITON,
    autotune_enabled,
    cuda_arch,
    deterministic_flag,
    dot_precision,
    next_pow2,
    on_device,
    runs_triton,
)
from .attention_choice import choose
from .kernel_utils import LaunchConfig, placeholder, refuse_double_backward

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernel_utils import gemv_t, head_program, load_tile, outer_fma

LOG2E = 1.4426950408889634
MAX_KERNEL_HEAD_DIM = 256
# fp32 runs its dots as three-pass TF32, whose split operands do not fit in registers beside
# 256-column accumulators (ptxas spills kilobytes): fp32 with D > 128 takes the PyTorch path.
FP32_MAX_HEAD_DIM = 128
TAIL = 16   # rows / keys of a tail block: the smallest tensor-core tile side


def kernel_head_dim_problem(d):
    """Why the kernels cannot take head dim `d` (None when they can): any multiple of 8 up to
    256, padded to the next power of two in the tiles (D = 88 runs in 128 columns). Every CLIP
    tower's head dim qualifies (64; 80 for ViT-H/14, 88 for ViT-g/14, 104 for ViT-bigG/14)."""
    if d % 8 or not 8 <= d <= MAX_KERNEL_HEAD_DIM:
        return (f"head dim D must be a multiple of 8 from 8 to {MAX_KERNEL_HEAD_DIM} for the Triton "
                f"kernels, got {d} (the PyTorch path, on the CPU, takes any D)")
    return None


def _check_inputs(q, k, v, rows, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, x, 4, "[B, H, N, D]")
    if q.dtype == torch.float64:
        raise TypeError("q must be float32, float16 or bfloat16 (float64 is the reference's dtype)")
    _checks.same_device_dtype(q=q, k=k, v=v)
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q [B, H, N, D]={tuple(q.shape)}, "
                             f"got {tuple(x.shape)}")
    b, h, n, d = q.shape
    problem = kernel_head_dim_problem(d) if runs_triton(q) and q.numel() else None
    if problem:
        raise ValueError(f"q: {problem}")
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"rows must be an int in [0, N={n}], got {type(rows).__name__}")
    if not 0 <= rows <= n:
        raise ValueError(f"rows must be in [0, N={n}], got {rows}" + (" (no token, no probe row)" if n == 0 else ""))
    if scale is None:
        return d ** -0.5 if d else 1.0
    return _checks.positive_finite("scale", scale)


def merged_view(v):
    """v [B, H, N, D] as [B, N, H·D] without a copy, or None when its strides do not allow it."""
    b, h, n, d = v.shape
    if v.stride(3) != 1 or (h > 1 and v.stride(1) != d):
        return None
    return v.as_strided((b, n, h * d), (v.stride(0), v.stride(2), 1), v.storage_offset())


def _is_packed(q, k, v):
    """True when q, k, v are the three [B, H, N, D] views of one packed [B, N, 3, H, D] buffer."""
    b, h, n, d = q.shape
    packed = (3 * h * n * d, d, 3 * h * d, 1)
    strides_ok = all(x.stride() == packed or (b == 1 and x.stride()[1:] == packed[1:])
                     for x in (q, k, v))
    storage = q.untyped_storage().data_ptr()
    if not strides_ok or any(x.untyped_storage().data_ptr() != storage for x in (k, v)):
        return False
    return (k.storage_offset() - q.storage_offset() == h * d
            and v.storage_offset() - q.storage_offset() == 2 * h * d)


def _packed_views(packed):
    """[B, N, 3, H, D] -> its q, k, v views [B, H, N, D]."""
    return tuple(packed[:, :, i].transpose(1, 2) for i in range(3))


class _SplitQKV(torch.autograd.Function):
    """q, k, v views of a packed projection whose gradient returns as one packed tensor.

    Autograd's own view backward would zero-fill a full-size buffer per view, copy each slice
    in and add the three; when the attention backward wrote dq, dk, dv into one packed buffer
    (it does, for packed inputs) that buffer is returned as it is.
    """

    @staticmethod
    def forward(qkv):
        return _packed_views(qkv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = (dq, dk, dv)
        if all(g is not None for g in grads) and _is_packed(*grads) and dq.storage_offset() == 0:
            b, h, n, d = dq.shape
            return dq.as_strided((b, n, 3, h, d), (3 * n * h * d, 3 * h * d, h * d, d, 1), 0)
        ref = next(g for g in grads if g is not None)
        b, h, n, d = ref.shape
        out = torch.empty((b, n, 3, h, d), dtype=ref.dtype, device=ref.device)
        for view, g in zip(_packed_views(out), grads):
            view.copy_(g) if g is not None else view.zero_()
        return out


def split_qkv(qkv):
    """q, k, v [B, H, N, D] views of a packed QKV projection `qkv` [B, N, 3, H, D], no copy.

    Feed them to `dual_attention` / `fused_alignclip_attention`: the gradient of `qkv` then
    comes back as the one packed buffer the attention backward writes, with no zero fills,
    slice copies or adds. Under torch.compile they are plain views.
    """
    _checks.tensor("qkv", qkv, 5, "[B, N, 3, H, D]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, N, 3, H, D], got {tuple(qkv.shape)}")
    if torch.compiler.is_compiling() or not runs_triton(qkv):
        return _packed_views(qkv)
    return _SplitQKV.apply(qkv)


def _torch_dual_attention(q, k, v, rows, scale, return_dv):
    """The PyTorch path (the SDPA composite): SDPA for the output, only the R probe rows' scores
    materialised, in fp32 whatever autocast is active (the contract's dtype for row_attn). A
    query row holding NaN or Inf gives a NaN output row, as the kernels' softmax does (CPU
    SDPA would return a finite row): q's row sums times zero are added, 0 for finite rows."""
    b, h, n, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = out + q.sum(-1, keepdim=True).mul(0)
    out = out.transpose(1, 2).reshape(b, n, h * d)
    # reshape is a view when v's heads sit side by side (a packed projection), a copy otherwise
    dv = v.transpose(1, 2).reshape(b, n, h * d) if return_dv else None
    row_attn = None
    if rows > 0:
        with torch.autocast(q.device.type, enabled=False):
            scores = q[:, :, :rows].float() @ k.float().transpose(-1, -2)
            row_attn = torch.softmax(scores * scale, dim=-1)
    return out, dv, row_attn


# -- launch configurations -----------------------------------------------------------------------

def _tile_sets(block_d, dtype, major):
    """(forward configurations, backward configurations) for CUDA: the first of each is the
    static default, the rest the autotuner's other candidates. Chosen from ptxas's reports
    (see ptxas_report): no spills on sm_90a or sm_80 with Triton 3.6 (the lent H200 image) and
    3.8, and at least 8 resident warps per SM."""
    def cfg(m, n, warps, stages=2):
        return LaunchConfig.of(num_warps=warps, num_stages=stages, BLOCK_M=m, BLOCK_N=n, BLOCK_D=block_d)

    hopper = major >= 9
    if block_d > 128:   # 256 columns (16-bit only, see FP32_MAX_HEAD_DIM): thin tiles over 8 warps;
        # Hopper's wgmma needs 64 query rows per warpgroup
        fwd = [cfg(64, 16, 8)] if hopper else [cfg(32, 32, 8), cfg(64, 16, 8)]
        return fwd, [cfg(16, 32, 8), cfg(32, 16, 8)]
    if dtype == torch.float32:   # tf32x3 operands are twice as wide as 16-bit ones, split in three
        if block_d > 64:
            return [cfg(16, 32, 8), cfg(16, 16, 8)], [cfg(32, 16, 8), cfg(16, 16, 8)]
        return [cfg(32, 32, 8), cfg(16, 16, 4)], [cfg(32, 16, 8), cfg(16, 16, 8)]
    stages = 3 if hopper else 2
    if block_d > 64:
        # 32 × 64 backward tiles spill once the offsets are int64 (ptxas report)
        if hopper:
            return [cfg(64, 32, 4, stages), cfg(64, 16, 8, stages)], [cfg(32, 32, 8)]
        return [cfg(64, 16, 8, stages), cfg(32, 32, 8, stages)], [cfg(32, 32, 8)]
    if hopper:
        return ([cfg(64, 64, 4, stages), cfg(128, 64, 8, stages), cfg(64, 32, 4, stages), cfg(128, 32, 8)],
                [cfg(32, 64, 8), cfg(64, 64, 8), cfg(32, 32, 4), cfg(32, 128, 8)])
    # Ampere's mma.sync tiles hold more registers: forwards at 4 warps (with int64 offsets) and
    # 64-query backwards spill there
    return ([cfg(64, 64, 8, stages), cfg(128, 32, 8)],
            [cfg(32, 64, 8), cfg(32, 32, 4), cfg(32, 128, 8)])


def _static_configs(head_dim, dtype, device):
    """{"fwd", "bwd", "pre", "dq"}: the static defaults (ALIGNCLIP_AUTOTUNE=0, the ptxas report,
    the work counter); under the interpreter one small fixed configuration. "dq" is the
    deterministic mode's dQ pass (a forward-shaped loop with two more products per tile)."""
    block_d = max(16, next_pow2(head_dim))
    pre = LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d)
    major = cuda_arch(device)
    if major is None:
        small = LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d)
        return {"fwd": small, "bwd": small, "pre": pre, "dq": small}
    fwd, bwd = _tile_sets(block_d, dtype, major)
    wide = block_d > 64 or dtype == torch.float32
    # 16-bit heads padded to 128 columns (D = 80, 88, 104) take 16-key steps: with 32, Triton
    # 3.6's ptxas spills at D = 88 (benchmarks/compat_check.sh 3.6.0)
    narrow_keys = block_d == 128 and dtype != torch.float32
    dq = LaunchConfig.of(num_warps=8 if block_d > 128 or dtype == torch.float32 else 4, num_stages=2,
                         BLOCK_M=16 if wide else 64, BLOCK_N=16 if narrow_keys else 32, BLOCK_D=block_d)
    return {"fwd": fwd[0], "bwd": bwd[0], "pre": pre, "dq": dq}


def autotune_candidates(head_dim, dtype, device):
    """{"fwd", "bwd"}: the configurations the autotuner times on CUDA (each one in the ptxas
    report, spill-free); the static default is the first."""
    major = cuda_arch(device)
    if major is None:
        static = _static_configs(head_dim, dtype, device)
        return {"fwd": [static["fwd"]], "bwd": [static["bwd"]]}
    fwd, bwd = _tile_sets(max(16, next_pow2(head_dim)), dtype, major)
    return {"fwd": fwd, "bwd": bwd}


def _blocks_with_tails(n, block):
    """Programs (or loop steps) for n rows in `block`-row blocks plus TAIL-row tails."""
    full = n // block
    return full + -(-(n - full * block) // TAIL)


if HAS_TRITON:

    @triton.jit
    def _attn_fwd_inner(
        q, m_i, l_i, acc, K, V, RowA, offs_m, offs_d, d_mask, lo, hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rr, N, R, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, STORE_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Online softmax over keys [lo, hi) in BLOCK_N steps; MASKED for the key tail."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            kt_mask = d_mask[:, None] & n_mask[None, :] if MASKED else d_mask[:, None]
            kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_mask,
                         other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if MASKED:
                s = tl.where(n_mask[None, :], s, float("-inf"))
            if STORE_ROWS:   # raw scores of the probe rows, rescaled in the epilogue
                tl.store(RowA + offs_m[:, None] * stride_rr + offs_n[None, :], s,
                         mask=(offs_m < R)[:, None] & n_mask[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_mask = n_mask[:, None] & d_mask[None, :] if MASKED else d_mask[None, :]
            v = load_tile(V, offs_n, offs_d, stride_vn, stride_vd, v_mask)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _attn_fwd_keys(
        q, K, V, RowA, offs_m, offs_d, d_mask, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_rr, N, R, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        STORE_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """All keys for one query block: full BLOCK_N blocks unmasked, then 16-key tails."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        full = (N // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _attn_fwd_inner(q, m_i, l_i, acc, K, V, RowA, offs_m, offs_d, d_mask, 0,
                                        full, stride_kn, stride_kd, stride_vn, stride_vd,
                                        stride_rr, N, R, qk_scale, BLOCK_N, False, STORE_ROWS,
                                        PRECISION)
        m_i, l_i, acc = _attn_fwd_inner(q, m_i, l_i, acc, K, V, RowA, offs_m, offs_d, d_mask, full,
                                        N, stride_kn, stride_kd, stride_vn, stride_vd, stride_rr, N,
                                        R, qk_scale, 16, True, STORE_ROWS, PRECISION)
        return m_i, l_i, acc

    @triton.jit
    def _attn_fwd_rows(
        Q, K, V, Out, DV, Lse, RowA, start_m, bh,
        stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_on, stride_dvn, stride_rr, N, R, D, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ROWS: tl.constexpr, WRITE_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        io_mask = m_mask[:, None] & d_mask[None, :]
        q = load_tile(Q, offs_m, offs_d, stride_qn, stride_qd, io_mask)
        probe = False
        if HAS_ROWS:
            probe = start_m < R
        if probe:
            m_i, l_i, acc = _attn_fwd_keys(q, K, V, RowA, offs_m, offs_d, d_mask, stride_kn,
                                           stride_kd, stride_vn, stride_vd, stride_rr, N, R,
                                           qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, True, PRECISION)
        else:
            m_i, l_i, acc = _attn_fwd_keys(q, K, V, RowA, offs_m, offs_d, d_mask, stride_kn,
                                           stride_kd, stride_vn, stride_vd, stride_rr, N, R,
                                           qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, False, PRECISION)
        acc = acc / l_i[:, None]
        tl.store(Out + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty),
                 mask=io_mask)
        tl.store(Lse + bh * N + offs_m, m_i + tl.log2(l_i), mask=m_mask)
        if WRITE_DV:
            v_rows = load_tile(V, offs_m, offs_d, stride_vn, stride_vd, io_mask)
            tl.store(DV + offs_m[:, None] * stride_dvn + offs_d[None, :], v_rows, mask=io_mask)
        if probe:
            # p = exp2(raw − lse) over the stored raw rows; other threads of this program stored
            # the raw scores and the LSE, hence the barrier.
            tl.debug_barrier()
            for i in range(0, BLOCK_M, 16):
                offs_r = start_m + i + tl.arange(0, 16)
                if start_m + i < R:
                    r_mask = (offs_r < R) & (offs_r < N)
                    lse_r = tl.load(Lse + bh * N + offs_r, mask=r_mask, other=0.0)
                    for c0 in range(0, N, 64):
                        offs_c = c0 + tl.arange(0, 64)
                        mask = r_mask[:, None] & (offs_c < N)[None, :]
                        raw = tl.load(RowA + offs_r[:, None] * stride_rr + offs_c[None, :],
                                      mask=mask, other=0.0)
                        tl.store(RowA + offs_r[:, None] * stride_rr + offs_c[None, :],
                                 tl.exp2(raw - lse_r[:, None]), mask=mask)

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, DV, Lse, RowA,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_on,
        stride_dvb, stride_dvn,
        stride_rb, stride_rh, stride_rr,
        H, N, R, D, N_BUCKET, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ROWS: tl.constexpr, WRITE_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        full = N // BLOCK_M
        pid_m, bh, b, h = head_program(tl.program_id(0), full + tl.cdiv(N - full * BLOCK_M, 16), H)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        Out += b * stride_ob + h * D
        DV += b * stride_dvb + h * D
        RowA += b * stride_rb + h * stride_rh
        if pid_m < full:
            _attn_fwd_rows(Q, K, V, Out, DV, Lse, RowA, pid_m * BLOCK_M, bh, stride_qn, stride_qd,
                           stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_dvn,
                           stride_rr, N, R, D, qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, HAS_ROWS,
                           WRITE_DV, PRECISION)
        else:
            _attn_fwd_rows(Q, K, V, Out, DV, Lse, RowA, full * BLOCK_M + (pid_m - full) * 16, bh,
                           stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_on, stride_dvn, stride_rr, N, R, D, qk_scale, 16, BLOCK_N,
                           BLOCK_D, HAS_ROWS, WRITE_DV, PRECISION)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        Out, DO, Delta, DQAcc, RowA, DRowA,
        stride_ob, stride_on,
        stride_dob, stride_don, stride_dod,
        stride_rb, stride_rh, stride_rr,
        stride_drb, stride_drh, stride_drr, stride_drn,
        H, N, R, D,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    ):
        pid_m, bh, b, h = head_program(tl.program_id(0), tl.cdiv(N, BLOCK_M), H)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        io_mask = m_mask[:, None] & (offs_d < D)[None, :]
        o = tl.load(Out + b * stride_ob + offs_m[:, None] * stride_on + h * D + offs_d[None, :],
                    mask=io_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_don
                     + (h * D + offs_d[None, :]) * stride_dod, mask=io_mask, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, axis=1)
        if HAS_DROW:
            if start_m < R:
                r_mask = offs_m < R
                for start_n in range(0, N, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    mask = r_mask[:, None] & (offs_n < N)[None, :]
                    a = tl.load(RowA + b * stride_rb + h * stride_rh + offs_m[:, None] * stride_rr
                                + offs_n[None, :], mask=mask, other=0.0)
                    da = tl.load(DRowA + b * stride_drb + h * stride_drh + offs_m[:, None] * stride_drr
                                 + offs_n[None, :] * stride_drn, mask=mask, other=0.0).to(tl.float32)
                    delta += tl.sum(a * da, axis=1)
        tl.store(Delta + bh * N + offs_m, delta, mask=m_mask)
        if DQ_ATOMIC:
            tl.store(DQAcc + (bh * N + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=m_mask[:, None])

    @triton.jit
    def _attn_bwd_inner(
        dk, dv, k, v, Q, DO, Lse, Delta, DQAcc, offs_n, offs_d, d_mask, lo, hi, bh,
        stride_qn, stride_qd, stride_don, stride_dod, N, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
        PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    ):
        """Query blocks [lo, hi) against one key block: the five products per tile pair (four
        without DQ_ATOMIC: the deterministic mode's dQ pass computes dS K itself)."""
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < N
            row_mask = m_mask[:, None] & d_mask[None, :] if MASKED else d_mask[None, :]
            q = load_tile(Q, offs_m, offs_d, stride_qn, stride_qd, row_mask)
            do = load_tile(DO, offs_m, offs_d, stride_don, stride_dod, row_mask)
            if MASKED:
                lse = tl.load(Lse + bh * N + offs_m, mask=m_mask, other=float("inf"))
                delta = tl.load(Delta + bh * N + offs_m, mask=m_mask, other=0.0)
            else:
                lse = tl.load(Lse + bh * N + offs_m)
                delta = tl.load(Delta + bh * N + offs_m)
            pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk += tl.dot(dst, q, input_precision=PRECISION)
            if DQ_ATOMIC:
                # Relaxed: the sum needs no ordering against other memory operations; the dQ
                # launch that reads it runs after this kernel has finished.
                dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION)
                tl.atomic_add(DQAcc + (bh * N + offs_m[:, None]) * BLOCK_D + offs_d[None, :], dq,
                              mask=m_mask[:, None] & d_mask[None, :], sem="relaxed")
        return dk, dv

    @triton.jit
    def _attn_bwd_keys(
        Q, K, V, DO, Lse, Delta, DQAcc, RowA, DRowA, DDV, DK, DVin, start_n, bh,
        stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_don, stride_dod, stride_rr, stride_drr, stride_drn, stride_ddn, stride_ddc,
        stride_dkn, stride_dkd, stride_dvn, stride_dvd,
        N, R, D, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, HAS_DDV: tl.constexpr, PRECISION: tl.constexpr,
        DQ_ATOMIC: tl.constexpr,
    ):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < N
        d_mask = offs_d < D
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = load_tile(K, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
        v = load_tile(V, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        full = (N // BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_inner(dk, dv, k, v, Q, DO, Lse, Delta, DQAcc, offs_n, offs_d, d_mask, 0,
                                 full, bh, stride_qn, stride_qd, stride_don, stride_dod, N,
                                 qk_scale, BLOCK_M, BLOCK_D, False, PRECISION, DQ_ATOMIC)
        dk, dv = _attn_bwd_inner(dk, dv, k, v, Q, DO, Lse, Delta, DQAcc, offs_n, offs_d, d_mask,
                                 full, N, bh, stride_qn, stride_qd, stride_don, stride_dod, N,
                                 qk_scale, 16, BLOCK_D, True, PRECISION, DQ_ATOMIC)
        if HAS_DROW:   # dK += Σ_{i<R} (P_i ∘ dA_i)ᵀ q_i, one rank-one update per probe row
            for r in range(0, R):
                p_r = tl.load(RowA + r * stride_rr + offs_n, mask=n_mask, other=0.0)
                da_r = tl.load(DRowA + r * stride_drr + offs_n * stride_drn, mask=n_mask,
                               other=0.0).to(tl.float32)
                q_r = tl.load(Q + r * stride_qn + offs_d * stride_qd, mask=d_mask, other=0.0)
                dk = outer_fma(dk, p_r * da_r, q_r)
        dk *= sm_scale
        if HAS_DDV:
            dv += load_tile(DDV, offs_n, offs_d, stride_ddn, stride_ddc, kv_mask).to(tl.float32)
        tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DVin + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DVin.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_main_kernel(
        Q, K, V, DO, Lse, Delta, DQAcc, RowA, DRowA, DDV, DK, DVin,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_don, stride_dod,
        stride_rb, stride_rh, stride_rr,
        stride_drb, stride_drh, stride_drr, stride_drn,
        stride_ddb, stride_ddn, stride_ddc,
        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
        H, N, R, D, N_BUCKET, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, HAS_DDV: tl.constexpr, PRECISION: tl.constexpr,
        DQ_ATOMIC: tl.constexpr,
    ):
        full = N // BLOCK_N
        pid_n, bh, b, h = head_program(tl.program_id(0), full + tl.cdiv(N - full * BLOCK_N, 16), H)
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + h * stride_kh
        V += b * stride_vb + h * stride_vh
        DO += b * stride_dob + h * D * stride_dod
        RowA += b * stride_rb + h * stride_rh
        DRowA += b * stride_drb + h * stride_drh
        DDV += b * stride_ddb + h * D * stride_ddc
        DK += b * stride_dkb + h * stride_dkh
        DVin += b * stride_dvb + h * stride_dvh
        if pid_n < full:
            _attn_bwd_keys(Q, K, V, DO, Lse, Delta, DQAcc, RowA, DRowA, DDV, DK, DVin,
                           pid_n * BLOCK_N, bh, stride_qn, stride_qd, stride_kn, stride_kd,
                           stride_vn, stride_vd, stride_don, stride_dod, stride_rr, stride_drr,
                           stride_drn, stride_ddn, stride_ddc, stride_dkn, stride_dkd, stride_dvn,
                           stride_dvd, N, R, D, qk_scale, sm_scale, BLOCK_M, BLOCK_N, BLOCK_D,
                           HAS_DROW, HAS_DDV, PRECISION, DQ_ATOMIC)
        else:
            _attn_bwd_keys(Q, K, V, DO, Lse, Delta, DQAcc, RowA, DRowA, DDV, DK, DVin,
                           full * BLOCK_N + (pid_n - full) * 16, bh, stride_qn, stride_qd,
                           stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                           stride_rr, stride_drr, stride_drn, stride_ddn, stride_ddc, stride_dkn,
                           stride_dkd, stride_dvn, stride_dvd, N, R, D, qk_scale, sm_scale, BLOCK_M,
                           16, BLOCK_D, HAS_DROW, HAS_DDV, PRECISION, DQ_ATOMIC)

    @triton.jit
    def _attn_dq_keys(
        Q, K, V, DO, Lse, Delta, offs_m, offs_d, m_mask, d_mask, bh,
        stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
        N, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Σ_j dS_ij k_j for one query block, walking every key block in order: the
        deterministic mode's dQ, which recomputes P and dP = dO Vᵀ instead of adding atomically."""
        io_mask = m_mask[:, None] & d_mask[None, :]
        q = load_tile(Q, offs_m, offs_d, stride_qn, stride_qd, io_mask)
        do = load_tile(DO, offs_m, offs_d, stride_don, stride_dod, io_mask)
        lse = tl.load(Lse + bh * N + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(Delta + bh * N + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < N)[:, None] & d_mask[None, :]
            k = load_tile(K, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
            v = load_tile(V, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            p = tl.where((offs_n < N)[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(k.dtype)
            dq += tl.dot(ds, k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        DQAcc, Q, K, V, DO, Lse, Delta, RowA, DRowA, DQ,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_don, stride_dod,
        stride_rb, stride_rh, stride_rr,
        stride_drb, stride_drh, stride_drr, stride_drn,
        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
        H, N, R, D, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_m, bh, b, h = head_program(tl.program_id(0), tl.cdiv(N, BLOCK_M), H)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        K += b * stride_kb + h * stride_kh
        if DQ_ATOMIC:
            dq = tl.load(DQAcc + (bh * N + offs_m[:, None]) * BLOCK_D + offs_d[None, :],
                         mask=m_mask[:, None], other=0.0)
        else:
            dq = _attn_dq_keys(Q + b * stride_qb + h * stride_qh, K, V + b * stride_vb + h * stride_vh,
                               DO + b * stride_dob + h * D * stride_dod, Lse, Delta, offs_m, offs_d,
                               m_mask, d_mask, bh, stride_qn, stride_qd, stride_kn, stride_kd,
                               stride_vn, stride_vd, stride_don, stride_dod, N, qk_scale, BLOCK_M,
                               BLOCK_N, BLOCK_D, PRECISION)
        if HAS_DROW:   # dQ_i += Σ_j P_ij dA_ij k_j for the probe rows of this block
            if start_m < R:
                RowA += b * stride_rb + h * stride_rh
                DRowA += b * stride_drb + h * stride_drh
                for i in range(0, BLOCK_M):
                    r = start_m + i
                    if r < R:
                        row = tl.zeros([BLOCK_D], tl.float32)
                        for start_n in range(0, N, BLOCK_N):
                            offs_n = start_n + tl.arange(0, BLOCK_N)
                            n_mask = offs_n < N
                            p_r = tl.load(RowA + r * stride_rr + offs_n, mask=n_mask, other=0.0)
                            da_r = tl.load(DRowA + r * stride_drr + offs_n * stride_drn,
                                           mask=n_mask, other=0.0).to(tl.float32)
                            k = load_tile(K, offs_n, offs_d, stride_kn, stride_kd,
                                          n_mask[:, None] & d_mask[None, :])
                            row += gemv_t(k, p_r * da_r)
                        dq = tl.where(offs_m[:, None] == r, dq + row[None, :], dq)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn
                 + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])


_TUNERS = {}


def _autotuned(name, kernel, candidates, key, reset_to_zero=None):
    """One `triton.autotune` wrapper per (kernel, candidate list), built on first use."""
    cache_key = (name, tuple(candidates), tuple(reset_to_zero or ()))
    if cache_key not in _TUNERS:
        _TUNERS[cache_key] = triton.autotune(
            configs=[c.to_triton() for c in candidates], key=key, reset_to_zero=reset_to_zero,
            cache_results=True)(kernel)
    return _TUNERS[cache_key]


def _use_autotune(device, config, exact_order):
    """Tiles timed on first use, or (the deterministic mode, whose bits must not depend on which
    candidate a machine's timing picked) the static ones."""
    return config is None and not exact_order and autotune_enabled() and cuda_arch(device) is not None \
        and device.type == "cuda"


def _attention_fwd(q, k, v, rows, scale, dv_out, config=None, exact_order=False):
    """(out [B, N, H·D], lse [B·H·N] fp32 base 2, row_attn [B, H, R, N] fp32 or None).

    Writes v with merged heads into `dv_out` when it is a tensor (a copy for the D-V branch)."""
    b, h, n, d = q.shape
    dev = q.device
    static = _static_configs(d, q.dtype, dev)
    out = torch.empty((b, n, h * d), dtype=q.dtype, device=dev)
    lse = torch.empty((b * h * n,), dtype=torch.float32, device=dev)
    row_attn = torch.empty((b, h, rows, n), dtype=torch.float32, device=dev) if rows > 0 else None
    unused = placeholder(dev)
    row_arg = row_attn if row_attn is not None else unused
    dv_arg = dv_out if dv_out is not None else unused
    args = dict(
        Q=q, K=k, V=v, Out=out, DV=dv_arg, Lse=lse, RowA=row_arg,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_ob=out.stride(0), stride_on=out.stride(1),
        stride_dvb=dv_arg.stride(0) if dv_out is not None else 0,
        stride_dvn=dv_arg.stride(1) if dv_out is not None else 0,
        stride_rb=row_arg.stride(0) if rows else 0, stride_rh=row_arg.stride(1) if rows else 0,
        stride_rr=row_arg.stride(2) if rows else 0,
        H=h, N=n, R=rows, D=d, N_BUCKET=next_pow2(n), qk_scale=scale * LOG2E,
        HAS_ROWS=rows > 0, WRITE_DV=dv_out is not None, PRECISION=dot_precision(q),
    )
    with on_device(q):
        if _use_autotune(dev, config, exact_order):
            candidates = autotune_candidates(d, q.dtype, dev)["fwd"]
            tuned = _autotuned("fwd", _attn_fwd_kernel, candidates, ["N_BUCKET", "D", "HAS_ROWS"])
            tuned[lambda meta: (_blocks_with_tails(n, meta["BLOCK_M"]) * b * h,)](**args)
        else:
            config = config or static["fwd"]
            _attn_fwd_kernel[(_blocks_with_tails(n, config["BLOCK_M"]) * b * h,)](**args, **config.kwargs)
    return out, lse, row_attn


def _attention_bwd(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn, rows, scale, dq, dk, dv,
                   config=None, exact_order=False):
    """Write dq, dk, dv (preallocated, any strides; views of one packed buffer for split_qkv).

    `exact_order` (the deterministic mode): no float atomics; the dQ launch walks the key blocks
    in order, recomputing P and dP, instead of reading what the key-block programs added."""
    with on_device(q):
        _attention_bwd_launches(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn, rows, scale, dq,
                                dk, dv, config, exact_order)


def _attention_bwd_launches(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn, rows, scale, dq, dk,
                            dv, config, exact_order):
    b, h, n, d = q.shape
    dev = q.device
    static = _static_configs(d, q.dtype, dev)
    block_d = static["bwd"]["BLOCK_D"]
    if d_out is None:
        d_out = torch.zeros_like(out)
    has_drow = d_rows is not None and rows > 0
    has_ddv = d_dv is not None
    unused = placeholder(dev)
    row_arg = row_attn if row_attn is not None else unused
    drow_arg = d_rows if has_drow else unused
    ddv_arg = d_dv if has_ddv else unused
    delta = torch.empty_like(lse)
    dq_acc = unused if exact_order else torch.empty((b * h * n, block_d), dtype=torch.float32, device=dev)
    row_strides = dict(stride_rb=row_arg.stride(0) if rows else 0,
                       stride_rh=row_arg.stride(1) if rows else 0,
                       stride_rr=row_arg.stride(2) if rows else 0)
    drow_strides = dict(stride_drb=drow_arg.stride(0) if has_drow else 0,
                        stride_drh=drow_arg.stride(1) if has_drow else 0,
                        stride_drr=drow_arg.stride(2) if has_drow else 0,
                        stride_drn=drow_arg.stride(3) if has_drow else 0)
    pre = static["pre"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(n, pre["BLOCK_M"]) * b * h,)](
        Out=out, DO=d_out, Delta=delta, DQAcc=dq_acc, RowA=row_arg, DRowA=drow_arg,
        stride_ob=out.stride(0), stride_on=out.stride(1),
        stride_dob=d_out.stride(0), stride_don=d_out.stride(1), stride_dod=d_out.stride(2),
        **row_strides, **drow_strides,
        H=h, N=n, R=rows, D=d, HAS_DROW=has_drow, DQ_ATOMIC=not exact_order,
        # without the zero fill, ptxas gives sm_80's 4-warp preprocess at BLOCK_D ≤ 128 so few
        # registers that it spills; 8 warps do not (ptxas report)
        **pre.replace(BLOCK_D=block_d, num_warps=8 if exact_order and block_d <= 128 else None).kwargs,
    )
    args = dict(
        Q=q, K=k, V=v, DO=d_out, Lse=lse, Delta=delta, DQAcc=dq_acc, RowA=row_arg, DRowA=drow_arg,
        DDV=ddv_arg, DK=dk, DVin=dv,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_dob=d_out.stride(0), stride_don=d_out.stride(1), stride_dod=d_out.stride(2),
        **row_strides, **drow_strides,
        stride_ddb=ddv_arg.stride(0) if has_ddv else 0,
        stride_ddn=ddv_arg.stride(1) if has_ddv else 0,
        stride_ddc=ddv_arg.stride(2) if has_ddv else 0,
        stride_dkb=dk.stride(0), stride_dkh=dk.stride(1), stride_dkn=dk.stride(2),
        stride_dkd=dk.stride(3),
        stride_dvb=dv.stride(0), stride_dvh=dv.stride(1), stride_dvn=dv.stride(2),
        stride_dvd=dv.stride(3),
        H=h, N=n, R=rows, D=d, N_BUCKET=next_pow2(n), qk_scale=scale * LOG2E, sm_scale=scale,
        HAS_DROW=has_drow, HAS_DDV=has_ddv, PRECISION=dot_precision(q), DQ_ATOMIC=not exact_order,
    )
    if _use_autotune(dev, config, exact_order):
        candidates = autotune_candidates(d, q.dtype, dev)["bwd"]
        tuned = _autotuned("bwd", _attn_bwd_main_kernel, candidates, ["N_BUCKET", "D", "HAS_DROW", "DQ_ATOMIC"],
                           reset_to_zero=None if exact_order else ["DQAcc"])
        tuned[lambda meta: (_blocks_with_tails(n, meta["BLOCK_N"]) * b * h,)](**args)
    else:
        config = config or static["bwd"]
        _attn_bwd_main_kernel[(_blocks_with_tails(n, config["BLOCK_N"]) * b * h,)](
            **args, **config.kwargs)
    dq_config = static["dq"] if exact_order else pre.replace(BLOCK_D=block_d)
    _attn_bwd_dq_kernel[(triton.cdiv(n, dq_config["BLOCK_M"]) * b * h,)](
        DQAcc=dq_acc, Q=q, K=k, V=v, DO=d_out, Lse=lse, Delta=delta, RowA=row_arg, DRowA=drow_arg,
        DQ=dq,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qn=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_dob=d_out.stride(0), stride_don=d_out.stride(1), stride_dod=d_out.stride(2),
        **row_strides, **drow_strides,
        stride_dqb=dq.stride(0), stride_dqh=dq.stride(1), stride_dqn=dq.stride(2),
        stride_dqd=dq.stride(3),
        H=h, N=n, R=rows, D=d, qk_scale=scale * LOG2E, sm_scale=scale, HAS_DROW=has_drow,
        DQ_ATOMIC=not exact_order, PRECISION=dot_precision(q), **dq_config.kwargs,
    )


def _save_for_backward(ctx, q, k, v, out, lse, row_attn, rows, scale, exact_order):
    ctx.save_for_backward(q, k, v, out, lse, row_attn)
    ctx.rows, ctx.scale, ctx.exact_order = rows, scale, exact_order


class _DualAttention(torch.autograd.Function):
    """Eager autograd: dv may be a view of v, and packed inputs get one packed gradient buffer."""

    @staticmethod
    def forward(q, k, v, rows, scale, return_dv, exact_order):
        dv = merged_view(v) if return_dv else None
        write_dv = return_dv and dv is None
        if write_dv:
            b, h, n, d = v.shape
            dv = torch.empty((b, n, h * d), dtype=v.dtype, device=v.device)
        out, lse, row_attn = _attention_fwd(q, k, v, rows, scale, dv if write_dv else None,
                                            exact_order=exact_order)
        return out, dv, row_attn, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, rows, scale, _, exact_order = inputs
        out, _, row_attn, lse = output
        _save_for_backward(ctx, q, k, v, out, lse, row_attn, rows, scale, exact_order)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_out, d_dv, d_rows, _d_lse):
        refuse_double_backward("dual_attention")
        q, k, v, out, lse, row_attn = ctx.saved_tensors
        if _is_packed(q, k, v):
            b, h, n, d = q.shape
            dq, dk, dv = _packed_views(torch.empty((b, n, 3, h, d), dtype=q.dtype, device=q.device))
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _attention_bwd(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn, ctx.rows, ctx.scale,
                       dq, dk, dv, exact_order=ctx.exact_order)
        return dq, dk, dv, None, None, None, None


@torch.library.custom_op("alignclip::dual_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, rows: int, scale: float,
                  return_dv: bool, exact_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    dv = torch.empty((b, n, h * d), dtype=v.dtype, device=v.device) if return_dv else None
    out, lse, row_attn = _attention_fwd(q, k, v, rows, scale, dv, exact_order=exact_order)
    empty = q.new_empty(0)
    return out, (dv if return_dv else empty), (row_attn if rows else empty.float()), lse


@_attention_op.register_fake
def _(q, k, v, rows, scale, return_dv, exact_order):
    b, h, n, d = q.shape
    return (q.new_empty((b, n, h * d)), q.new_empty((b, n, h * d) if return_dv else (0,)),
            q.new_empty((b, h, rows, n) if rows else (0,), dtype=torch.float32),
            q.new_empty((b * h * n,), dtype=torch.float32))


@torch.library.custom_op("alignclip::dual_attention_backward", mutates_args=())
def _attention_bwd_op(d_out: Optional[Tensor], d_dv: Optional[Tensor], d_rows: Optional[Tensor],
                      q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, row_attn: Tensor,
                      rows: int, scale: float, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _attention_bwd(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn if rows else None, rows, scale,
                   dq, dk, dv, exact_order=exact_order)
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(d_out, d_dv, d_rows, q, k, v, out, lse, row_attn, rows, scale, exact_order):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup_context(ctx, inputs, output):
    q, k, v, rows, scale, _, exact_order = inputs
    out, _, row_attn, lse = output
    _save_for_backward(ctx, q, k, v, out, lse, row_attn, rows, scale, exact_order)
    ctx.set_materialize_grads(False)


def _op_backward(ctx, d_out, d_dv, d_rows, _d_lse):
    refuse_double_backward("dual_attention")
    q, k, v, out, lse, row_attn = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(d_out, d_dv if d_dv is not None and d_dv.numel() else None,
                                   d_rows if ctx.rows else None, q, k, v, out, lse, row_attn,
                                   ctx.rows, ctx.scale, ctx.exact_order)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def run_path(path, q, k, v, rows, scale, return_dv, exact_order=False):
    """(out, dv or None, row_attn or None) on one path ("triton" or "sdpa"), inputs checked."""
    if path == "sdpa":
        return _torch_dual_attention(q, k, v, rows, scale, return_dv)
    if torch.compiler.is_compiling():
        out, dv, row_attn, _ = _attention_op(q, k, v, rows, scale, return_dv, exact_order)
    else:
        out, dv, row_attn, _ = _DualAttention.apply(q, k, v, rows, scale, return_dv, exact_order)
    return out, (dv if return_dv else None), (row_attn if rows else None)


def dual_attention(q, k, v, *, rows=1, scale=None, return_dv=True, deterministic=None):
    """Q-K-V attention, the D-V branch and the exact softmax rows of the first `rows` queries.

    q, k, v: [B, H, N, D] with any strides (D a multiple of 8 up to 256 on the kernels, any D on
    the PyTorch path; any dimension may be 0). Returns `(out [B, N, H·D], dv [B, N, H·D] or
    None, row_attn [B, H, rows, N] fp32 or None when rows == 0)`. On CUDA the kernels or the
    SDPA composite run, whichever is faster for the shape (`attention_choice.py`;
    `ALIGNCLIP_ATTENTION` forces one). `deterministic` (default: whether
    `torch.use_deterministic_algorithms` is on) computes dQ without float atomics, in a pass of
    its own, with the static tiles: bitwise-repeatable gradients for 1.4x the backward's products.
    """
    scale = _check_inputs(q, k, v, rows, scale)
    return_dv = bool(return_dv)
    exact_order = deterministic_flag(deterministic)
    if not runs_triton(q) or q.numel() == 0 or (q.dtype == torch.float32 and q.shape[-1] > FP32_MAX_HEAD_DIM):
        return _torch_dual_attention(q, k, v, rows, scale, return_dv)
    return run_path(choose(q, rows, exact_order), q, k, v, rows, scale, return_dv, exact_order)


def fused_alignclip_attention(q, k, v, *, scale=None, return_dv=True, return_cls_attn=True,
                              deterministic=None):
    """AlignCLIP's attention: `(out [B, N, C], dv [B, N, C] or None, cls_attn [B, H, N] fp32 or None)`."""
    out, dv, rows = dual_attention(q, k, v, rows=1 if return_cls_attn else 0, scale=scale,
                                   return_dv=return_dv, deterministic=deterministic)
    return out, dv, rows[:, :, 0] if rows is not None else None
