r"""Dual-branch attention: Q-K-V output, the D-V branch and exact softmax probe rows.

For q, k, v of shape [B, H, N, D] and s = scale:

    P        = softmax(s · q kᵀ)                     (fp32 statistics, never stored)
    out      = merge_heads(P v)                      [B, N, H·D]
    dv       = merge_heads(v)                        [B, N, H·D]   (D-V branch, D = I)
    row_attn = P[:, :, :R]                           [B, H, R, N]  fp32

Forward: one launch, FlashAttention-style online softmax in base 2; programs whose query block
holds rows < R make a second pass over the keys with the final log-sum-exp to write their exact
probabilities, 16 rows at a time when R ≤ 16 (the CLS row costs a 16-row pass, not a block's). `dv` is returned as a strided view of v when v's heads sit side by side
(stride(d) = 1, stride(h) = D: a view of a packed QKV projection), else written by the same
launch.

Backward: three launches. With dP = dO vᵀ + dA (dA = d(row_attn), rows < R only) and
Δ = rowsum(dO ∘ O) + rowsum(P ∘ dA),

    dS = P ∘ (dP − Δ),   dQ = s · dS k,   dK = s · dSᵀ q,   dV = Pᵀ dO + d(dv)

1. preprocess: Δ per query row;  2. dK, dV per key block (d(dv) folded in);  3. dQ per query
block.
"""
import torch
import torch.nn.functional as F

from . import _checks
from ._runtime import HAS_TRITON, cuda_arch, dot_precision, next_pow2, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 80, 96, 128)


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
    if min(b, h, n) < 1:
        raise ValueError(f"q must have B, H, N >= 1, got {tuple(q.shape)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"q: head dim D must be one of {HEAD_DIMS}, got {d}")
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise TypeError(f"rows must be an int in [0, N={n}], got {type(rows).__name__}")
    if not 0 <= rows <= n:
        raise ValueError(f"rows must be in [0, N={n}], got {rows}")
    return d ** -0.5 if scale is None else _checks.positive_finite("scale", scale)


def _merged_view(v):
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
    if not strides_ok or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr() or \
            q.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
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
    def forward(ctx, qkv):
        ctx.set_materialize_grads(False)
        return _packed_views(qkv)

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
    slice copies or adds.
    """
    _checks.tensor("qkv", qkv, 5, "[B, N, 3, H, D]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, N, 3, H, D], got {tuple(qkv.shape)}")
    return _SplitQKV.apply(qkv)


def _torch_dual_attention(q, k, v, rows, scale, return_dv):
    """CPU fallback: SDPA for the output, only the R probe rows' scores materialised."""
    b, h, n, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = out.transpose(1, 2).reshape(b, n, h * d)
    dv = None
    if return_dv:
        dv = _merged_view(v)
        if dv is None:
            dv = v.transpose(1, 2).reshape(b, n, h * d)
    row_attn = None
    if rows > 0:
        scores = q[:, :, :rows].float() @ k.float().transpose(-1, -2)
        row_attn = torch.softmax(scores * scale, dim=-1)
    return out, dv, row_attn


def attention_configs(head_dim, dtype, device):
    """Launch configurations {"fwd", "bwd_kv", "bwd_q", "pre"}: dicts of block sizes and warps.

    Under the interpreter one small fixed configuration (no tuning); on CUDA by architecture
    (sm_90 Hopper, sm_80 Ampere and others), head dim and dtype; fp32 runs three-pass TF32 dots
    (wider operands) and takes smaller tiles to stay within registers.
    """
    block_d = max(16, next_pow2(head_dim))
    major = cuda_arch(device)
    if major is None:
        small = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
        return {"fwd": small, "bwd_kv": small, "bwd_q": small, "pre": small}
    # Tiles sized from ptxas's reports (python -m alignclip_kernels.inspect): no spills and at
    # least 8 resident warps per SM. Hopper keeps 4-warp forwards (one warpgroup per 64-row wgmma);
    # Ampere's mma.sync forwards take 8 warps where 4 would sit at 255 registers.
    wide = block_d > 64
    stages = 3 if major >= 9 else 2
    if dtype == torch.float32:   # tf32x3 operands are twice as wide as 16-bit ones
        stages = 2
        tile = 16 if wide else 32
        fwd = dict(BLOCK_M=64 if not wide else 16, BLOCK_N=32 if not wide else 16,
                   num_warps=4 if not wide and major >= 9 else 8)
        kv = dict(BLOCK_M=tile, BLOCK_N=tile, num_warps=8)
        qb = dict(BLOCK_M=tile, BLOCK_N=tile, num_warps=8)
    else:
        fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if wide and major < 9 else 4)
        kv = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8 if wide else 4)
        qb = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if wide else 4)
    pre = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
    fwd, kv, qb = (dict(cfg, num_stages=stages) for cfg in (fwd, kv, qb))
    return {key: dict(cfg, BLOCK_D=block_d) for key, cfg in
            (("fwd", fwd), ("bwd_kv", kv), ("bwd_q", qb), ("pre", pre))}


if HAS_TRITON:

    @triton.jit
    def _program(H, BLOCK: tl.constexpr):
        """(flat batch·head index, batch, head, this program's row offsets) of a (rows, B·H) grid."""
        pid_bh = tl.program_id(1)
        return pid_bh, pid_bh // H, pid_bh % H, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def _load_rows(ptr, rows, row_stride, cols, col_stride, row_mask, col_mask):
        """A [rows, cols] tile, zero outside the masks."""
        return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                       mask=row_mask[:, None] & col_mask[None, :], other=0.0)

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, Out, DV, Lse, RowA,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, son, sdvb, sdvn, srb, srh, srr,
        H, N, R, D, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PROBE_M: tl.constexpr, WRITE_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_bh, b, h, offs_m = _program(H, BLOCK_M)
        pid_m = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        q = _load_rows(Q, offs_m, sqn, offs_d, sqd, m_mask, d_mask)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                         mask=d_mask[:, None] & n_mask[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(V, offs_n, svn, offs_d, svd, n_mask, d_mask)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        io_mask = m_mask[:, None] & d_mask[None, :]
        tl.store(Out + b * sob + offs_m[:, None] * son + h * D + offs_d[None, :],
                 acc.to(Out.dtype.element_ty), mask=io_mask)
        tl.store(Lse + pid_bh * N + offs_m, lse, mask=m_mask)
        if WRITE_DV:
            v_rows = tl.load(V + offs_m[:, None] * svn + offs_d[None, :] * svd, mask=io_mask)
            tl.store(DV + b * sdvb + offs_m[:, None] * sdvn + h * D + offs_d[None, :], v_rows,
                     mask=io_mask)
        if pid_m * BLOCK_M < R:
            # Exact probabilities of the probe rows, from the final log-sum-exp. PROBE_M rows at
            # a time (16 for the CLS row alone, not the whole block): their q and LSE are read
            # back, the LSE after a barrier since other threads of this program stored it.
            tl.debug_barrier()
            RowA += b * srb + h * srh
            r_end = tl.minimum(R, pid_m * BLOCK_M + BLOCK_M)
            for r0 in range(pid_m * BLOCK_M, r_end, PROBE_M):
                offs_r = r0 + tl.arange(0, PROBE_M)
                r_mask = offs_r < r_end
                q_r = _load_rows(Q, offs_r, sqn, offs_d, sqd, r_mask, d_mask)
                lse_r = tl.load(Lse + pid_bh * N + offs_r, mask=r_mask, other=0.0)
                for start_n in range(0, N, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    n_mask = offs_n < N
                    kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                                 mask=d_mask[:, None] & n_mask[None, :], other=0.0)
                    p = tl.exp2(tl.dot(q_r, kt, input_precision=PRECISION) * qk_scale - lse_r[:, None])
                    tl.store(RowA + offs_r[:, None] * srr + offs_n[None, :], p,
                             mask=r_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        Out, DO, Delta, RowA, DRowA,
        sob, son, sdob, sdon, sdod, srb, srh, srr, sdrb, sdrh, sdrr, sdrn,
        H, N, R, D,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr,
    ):
        pid_bh, b, h, offs_m = _program(H, BLOCK_M)
        pid_m = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        io_mask = m_mask[:, None] & (offs_d < D)[None, :]
        o = tl.load(Out + b * sob + offs_m[:, None] * son + h * D + offs_d[None, :],
                    mask=io_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + offs_m[:, None] * sdon + (h * D + offs_d[None, :]) * sdod,
                     mask=io_mask, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        if HAS_DROW:
            if pid_m * BLOCK_M < R:
                r_mask = offs_m < R
                for start_n in range(0, N, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    mask = r_mask[:, None] & (offs_n < N)[None, :]
                    a = tl.load(RowA + b * srb + h * srh + offs_m[:, None] * srr + offs_n[None, :],
                                mask=mask, other=0.0)
                    da = tl.load(DRowA + b * sdrb + h * sdrh + offs_m[:, None] * sdrr
                                 + offs_n[None, :] * sdrn, mask=mask, other=0.0).to(tl.float32)
                    delta += tl.sum(a * da, 1)
        tl.store(Delta + pid_bh * N + offs_m, delta, mask=m_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DRowA, DDV, DK, DVin,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sdob, sdon, sdod, sdrb, sdrh, sdrr, sdrn, sddb, sddn, sddc,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        H, N, R, D, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, HAS_DDV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_bh, b, h, offs_n = _program(H, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < N
        d_mask = offs_d < D
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = _load_rows(K + b * skb + h * skh, offs_n, skn, offs_d, skd, n_mask, d_mask)
        v = _load_rows(V + b * svb + h * svh, offs_n, svn, offs_d, svd, n_mask, d_mask)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        Q += b * sqb + h * sqh
        DO += b * sdob + h * D * sdod
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < N
            q = _load_rows(Q, offs_m, sqn, offs_d, sqd, m_mask, d_mask)
            do = _load_rows(DO, offs_m, sdon, offs_d, sdod, m_mask, d_mask)
            lse = tl.load(Lse + pid_bh * N + offs_m, mask=m_mask, other=float("inf"))
            delta = tl.load(Delta + pid_bh * N + offs_m, mask=m_mask, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pt = tl.exp2(st - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if HAS_DROW:
                if start_m < R:
                    da_mask = n_mask[:, None] & (offs_m < R)[None, :]
                    dpt += tl.load(DRowA + b * sdrb + h * sdrh + offs_m[None, :] * sdrr
                                   + offs_n[:, None] * sdrn, mask=da_mask, other=0.0).to(tl.float32)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        dk *= sm_scale
        if HAS_DDV:
            dv += tl.load(DDV + b * sddb + offs_n[:, None] * sddn + (h * D + offs_d[None, :]) * sddc,
                          mask=kv_mask, other=0.0).to(tl.float32)
        tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DVin + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
                 dv.to(DVin.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, Lse, Delta, DRowA, DQ,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sdob, sdon, sdod, sdrb, sdrh, sdrr, sdrn, sdqb, sdqh, sdqn, sdqd,
        H, N, R, D, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_DROW: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid_bh, b, h, offs_m = _program(H, BLOCK_M)
        pid_m = tl.program_id(0)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqn, offs_d, sqd, m_mask, d_mask)
        do = _load_rows(DO + b * sdob + h * D * sdod, offs_m, sdon, offs_d, sdod, m_mask, d_mask)
        lse = tl.load(Lse + pid_bh * N + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(Delta + pid_bh * N + offs_m, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        K += b * skb + h * skh
        V += b * svb + h * svh
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            k = _load_rows(K, offs_n, skn, offs_d, skd, n_mask, d_mask)
            v = _load_rows(V, offs_n, svn, offs_d, svd, n_mask, d_mask)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROW:
                if pid_m * BLOCK_M < R:
                    da_mask = (offs_m < R)[:, None] & n_mask[None, :]
                    dp += tl.load(DRowA + b * sdrb + h * sdrh + offs_m[:, None] * sdrr
                                  + offs_n[None, :] * sdrn, mask=da_mask, other=0.0).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq *= sm_scale
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


def _launch_opts(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _blocks(cfg, *names):
    return {name: cfg[name] for name in names}


class _DualAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rows, scale, return_dv):
        b, h, n, d = q.shape
        cfgs = attention_configs(d, q.dtype, q.device)
        out = torch.empty((b, n, h * d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b * h * n,), dtype=torch.float32, device=q.device)
        dv = _merged_view(v) if return_dv else None
        write_dv = return_dv and dv is None
        if write_dv:
            dv = torch.empty((b, n, h * d), dtype=v.dtype, device=v.device)
        row_attn = (torch.empty((b, h, rows, n), dtype=torch.float32, device=q.device)
                    if rows > 0 else None)
        dv_arg = dv if write_dv else out
        row_arg = row_attn if row_attn is not None else lse
        row_strides = row_attn.stride()[:3] if row_attn is not None else (0, 0, 0)
        cfg = cfgs["fwd"]
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
        _attn_fwd_kernel[grid](
            q, k, v, out, dv_arg, lse, row_arg,
            *q.stride(), *k.stride(), *v.stride(),
            out.stride(0), out.stride(1), dv_arg.stride(0), dv_arg.stride(1), *row_strides,
            h, n, rows, d, scale * LOG2E,
            **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"),
            PROBE_M=16 if rows <= 16 else cfg["BLOCK_M"],
            WRITE_DV=write_dv, PRECISION=dot_precision(q), **_launch_opts(cfg),
        )
        ctx.save_for_backward(q, k, v, out, lse, row_attn)
        ctx.scale = scale
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        return out, dv, row_attn

    @staticmethod
    def backward(ctx, d_out, d_dv, d_rows):
        q, k, v, out, lse, row_attn = ctx.saved_tensors
        b, h, n, d = q.shape
        rows, scale = ctx.rows, ctx.scale
        cfgs = attention_configs(d, q.dtype, q.device)
        if d_out is None:
            d_out = torch.zeros_like(out)
        has_drow = d_rows is not None
        has_ddv = d_dv is not None
        delta = torch.empty_like(lse)
        drow_arg = d_rows if has_drow else lse
        drow_strides = d_rows.stride() if has_drow else (0, 0, 0, 0)
        row_arg = row_attn if row_attn is not None else lse
        row_strides = row_attn.stride()[:3] if row_attn is not None else (0, 0, 0)
        ddv_arg = d_dv if has_ddv else d_out
        cfg = cfgs["pre"]
        _attn_bwd_preprocess_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
            out, d_out, delta, row_arg, drow_arg,
            out.stride(0), out.stride(1), *d_out.stride(), *row_strides, *drow_strides,
            h, n, rows, d, **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"),
            HAS_DROW=has_drow, **_launch_opts(cfg),
        )
        if _is_packed(q, k, v):   # one packed gradient buffer, handed on by split_qkv as is
            dq, dk, dv = _packed_views(torch.empty((b, n, 3, h, d), dtype=q.dtype, device=q.device))
        else:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        precision = dot_precision(q)
        cfg = cfgs["bwd_kv"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), b * h)](
            q, k, v, d_out, lse, delta, drow_arg, ddv_arg, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *drow_strides,
            *ddv_arg.stride(), *dk.stride(), *dv.stride(),
            h, n, rows, d, scale * LOG2E, scale,
            **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"),
            HAS_DROW=has_drow, HAS_DDV=has_ddv, PRECISION=precision, **_launch_opts(cfg),
        )
        cfg = cfgs["bwd_q"]
        _attn_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), b * h)](
            q, k, v, d_out, lse, delta, drow_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *drow_strides, *dq.stride(),
            h, n, rows, d, scale * LOG2E, scale,
            **_blocks(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D"),
            HAS_DROW=has_drow, PRECISION=precision, **_launch_opts(cfg),
        )
        return dq, dk, dv, None, None, None


def dual_attention(q, k, v, *, rows=1, scale=None, return_dv=True):
    """Q-K-V attention, the D-V branch and the exact softmax rows of the first `rows` queries.

    q, k, v: [B, H, N, D] with any strides. Returns `(out [B, N, H·D], dv [B, N, H·D] or None,
    row_attn [B, H, rows, N] fp32 or None when rows == 0)`.
    """
    scale = _check_inputs(q, k, v, rows, scale)
    if not runs_triton(q):
        return _torch_dual_attention(q, k, v, rows, scale, return_dv)
    return _DualAttention.apply(q, k, v, rows, scale, bool(return_dv))


def fused_alignclip_attention(q, k, v, *, scale=None, return_dv=True, return_cls_attn=True):
    """AlignCLIP's attention: `(out [B, N, C], dv [B, N, C] or None, cls_attn [B, H, N] fp32 or None)`."""
    out, dv, rows = dual_attention(q, k, v, rows=1 if return_cls_attn else 0, scale=scale,
                                   return_dv=return_dv)
    return out, dv, rows[:, :, 0] if rows is not None else None

