r"""Similarity alignment: KL(Q ‖ Pr) between the two paths' patch-to-class maps.

For tokens u, u_dv [B, P, E] of the original and D-V paths and text t [K, E]:

    S[b, n, c] = û_n · t̂_c,  S_dv likewise from u_dv,   (x̂ = x / max(‖x‖, ε))
    Pr = softmax_n S,  Q = softmax_n S_dv,   loss = (1/B) Σ_{b,c} KL_c,  KL_c = Σ_n Q (log Q − log Pr)

|S| ≤ 1, so the patch softmax needs no running maximum: with l_p = Σ_n e^{S−1},
l_q = Σ_n e^{S_dv−1} and w = Σ_n e^{S_dv−1} (S_dv − S), KL_c = w / l_q − log(l_q / l_p), and
all three sums are additive over patch blocks. Nothing of size [B, P, K] is stored. With
g = d loss / B:

    dS_dv = g Q (S_dv − S − log(l_q / l_p) − KL_c),     dS = g (Pr − Q)
    dû_n = Σ_c dS t̂_c,   du_n = (dû_n − [‖u_n‖ ≥ ε] û_n r_n) / max(‖u_n‖, ε),  r_n = Σ_c dS S
    dt̂_c = Σ_{b,n} dS û_n + dS_dv û_dv_n,  then the normalisation's backward for each text row

Forward, one launch over (image, class block[, patch split]): a program holds BLOCK_K classes and
streams the image's patch blocks; when B × class blocks alone would leave multiprocessors idle
(few classes), an image's patches are split over programs that add their (l_p, l_q, w)
atomically, the last of them finishing the KL. Backward, one launch over (image, patch block):
the program holds both paths' dû accumulators for ACC_E columns (all of E = 512 in 16-bit) and
streams the classes, computing each S tile once per pass (its E chunks come from L1); with
d(text) the unprojected d t̂ is accumulated atomically and a second, K-row launch applies the
normalisation's backward. Classes come in full BLOCK_K blocks on tensor
cores plus one tail of K mod BLOCK_K: on tensor cores padded to a power of two when it is 16
or more, else on CUDA cores, one class at a time in the backward.

Necessary multiply-adds (`roofline.similarity_align`): 2·B·P·K·E forward (S, S_dv); 4·B·P·K·E
backward (S, S_dv again, since nothing [B, P, K] is kept, and dû, dû_dv); 2·B·P·K·E more for
d(text).
"""
import torch
from torch import Tensor

from . import _checks, reference
from ._runtime import (
    HAS_TRITON,
    cuda_arch,
    deterministic_flag,
    dot_precision,
    loss_pytorch_path,
    next_pow2,
    on_device,
    runs_triton,
)
from .kernel_utils import LaunchConfig, loss_buffer, loss_total, placeholder, refuse_double_backward, split_blocks

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernel_utils import (
        accumulate,
        add_loss,
        fma_dot,
        gemv_t,
        inv_norm,
        last_to_arrive,
        normalize_backward,
        outer_fma,
        split_block,
    )

EPS = reference.NORM_EPS


FMA_E = 16   # E step of the CUDA-core class tail: its [patches, E step, classes] product stays small


def similarity_configs(e, dtype, device, text_grad=False, exact_order=False):
    """(forward, backward) configurations.

    The backward holds two fp32 [BLOCK_P, ACC_E] accumulators in registers and streams token
    rows and text through L1 for each class block (held as tensor-core operands with K = E they
    would be replicated in every warp). 16-bit inputs take the whole E = 512 in one pass with
    BLOCK_K = 32 (BLOCK_K = 16 spills on ptxas: more, smaller dots); fp32 (three-pass TF32
    operands, twice as wide) and d(text) take a quarter of it per pass, and fp32's d(text) runs
    one class at a time on CUDA cores (see ptxas_report). The deterministic mode's fp32 d(text),
    which reads back its partial d t̂, takes an eighth (a quarter spills on sm_80).
    """
    e_pad = next_pow2(e)
    if cuda_arch(device) is None:
        return (LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_P=16, BLOCK_K=16, BLOCK_E=32),
                LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_P=16, BLOCK_K=16, BLOCK_E=64,
                                ACC_E=min(64, e_pad)))
    wide = dtype == torch.float32
    fwd = LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_P=16, BLOCK_K=16 if wide else 32,
                          BLOCK_E=32)
    acc_e = 64 if wide and text_grad and exact_order else 128 if wide or text_grad else 512
    bwd = LaunchConfig.of(num_warps=8, num_stages=2, BLOCK_P=16, BLOCK_K=32,
                          BLOCK_E=32 if wide else 64, ACC_E=min(acc_e, e_pad))
    return fwd, bwd


def _class_split(k, block_k):
    """(full blocks, tail size, tail padded to a power of two, tail on tensor cores)."""
    full, rem = divmod(k, block_k)
    tail = next_pow2(rem) if rem else 0
    return full, rem, tail, tail >= 16


if HAS_TRITON:

    @triton.jit
    def text_block_norms(Text, offs_k, k_mask, stride_xk, stride_xe, E, eps, BLOCK_E: tl.constexpr):
        """(1 / max(‖t_c‖, ε), ‖t_c‖) for a block of text rows, streamed over E."""
        tt = tl.zeros(offs_k.shape, tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            t = tl.load(Text + offs_k[:, None] * stride_xk + offs_e[None, :] * stride_xe,
                        mask=k_mask[:, None] & (offs_e < E)[None, :], other=0.0).to(tl.float32)
            tt += tl.sum(t * t, axis=1)
        return inv_norm(tt, eps), tl.sqrt(tt)

    @triton.jit
    def cosine_tiles(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, Text, stride_xk,
                     stride_xe, offs_p, p_mask, offs_k, k_mask, E, inv_nt, eps,
                     BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                     TENSOR_CORES: tl.constexpr, PRECISION: tl.constexpr):
        """S and S_dv [BLOCK_P, BLOCK_K] for a block of patches and classes, streamed over E."""
        s = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        s_dv = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        uu = tl.zeros([BLOCK_P], tl.float32)
        uu_dv = tl.zeros([BLOCK_P], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            u_mask = p_mask[:, None] & e_mask[None, :]
            u = tl.load(Tok + offs_p[:, None] * stride_tp + offs_e[None, :] * stride_te, mask=u_mask,
                        other=0.0)
            u_dv = tl.load(TokDv + offs_p[:, None] * stride_vp + offs_e[None, :] * stride_ve,
                           mask=u_mask, other=0.0)
            t_cols = tl.load(Text + offs_e[:, None] * stride_xe + offs_k[None, :] * stride_xk,
                             mask=e_mask[:, None] & k_mask[None, :], other=0.0)
            if TENSOR_CORES:
                s += tl.dot(u, t_cols, input_precision=PRECISION)
                s_dv += tl.dot(u_dv, t_cols, input_precision=PRECISION)
            else:
                s += fma_dot(u, t_cols)
                s_dv += fma_dot(u_dv, t_cols)
            u = u.to(tl.float32)
            u_dv = u_dv.to(tl.float32)
            uu += tl.sum(u * u, axis=1)
            uu_dv += tl.sum(u_dv * u_dv, axis=1)
        scale = inv_nt[None, :]
        return s * inv_norm(uu, eps)[:, None] * scale, s_dv * inv_norm(uu_dv, eps)[:, None] * scale

    @triton.jit
    def split_sum(Part, n_splits, stride, offs_k, k_mask, other):
        """Σ over the splits (at most MAX_SPLITS = 16) of Part[split · stride + offs_k], `other`
        where k is masked."""
        offs_s = tl.arange(0, 16)
        tile = tl.load(Part + offs_s[:, None] * stride + offs_k[None, :],
                       mask=(offs_s < n_splits)[:, None] & k_mask[None, :], other=0.0, cache_modifier=".cg")
        return tl.where(k_mask, tl.sum(tile, axis=0), other)

    @triton.jit
    def _sim_fwd_classes(
        Tok, TokDv, Text, Stats, TextNorm, Loss, Parts, Tickets, stride_tp, stride_te, stride_vp,
        stride_ve, stride_xk, stride_xe, b, k0, P, E, K, n_blocks, blocks_per_program, inv_b, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        TENSOR_CORES: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
        EXACT_ORDER: tl.constexpr,
    ):
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        inv_nt, nt = text_block_norms(Text, offs_k, k_mask, stride_xk, stride_xe, E, eps, BLOCK_E)
        if (b == 0) & (split == 0):   # ‖t_c‖ for the backward, once per class
            tl.store(TextNorm + offs_k, nt, mask=k_mask)
        l_p = tl.zeros([BLOCK_K], tl.float32)
        l_q = tl.zeros([BLOCK_K], tl.float32)
        w = tl.zeros([BLOCK_K], tl.float32)
        for i in range(0, blocks_per_program):
            valid, offs_p, p_mask = split_block(split, i, blocks_per_program, n_blocks, P, BLOCK_P)
            if valid:
                s, s_dv = cosine_tiles(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, Text,
                                       stride_xk, stride_xe, offs_p, p_mask, offs_k, k_mask, E,
                                       inv_nt, eps, BLOCK_P, BLOCK_K, BLOCK_E, TENSOR_CORES,
                                       PRECISION)
                rows = p_mask[:, None]
                e_p = tl.where(rows, tl.exp(s - 1.0), 0.0)
                e_q = tl.where(rows, tl.exp(s_dv - 1.0), 0.0)
                l_p += tl.sum(e_p, axis=0)
                l_q += tl.sum(e_q, axis=0)
                w += tl.sum(e_q * (s_dv - s), axis=0)
        stats = Stats + b * 3 * K
        slot = b * tl.num_programs(1) + tl.program_id(1)
        if SPLIT:
            # Each split's sums: added into the image's statistics, or (EXACT_ORDER) stored as
            # its own [3, K] partial, which the last to arrive adds up in split order.
            if EXACT_ORDER:
                part = Parts + (b * n_splits + split) * 3 * K
                tl.store(part + offs_k, l_p, mask=k_mask)
                tl.store(part + K + offs_k, l_q, mask=k_mask)
                tl.store(part + 2 * K + offs_k, w, mask=k_mask)
            else:
                accumulate(stats + offs_k, l_p, k_mask, False)
                accumulate(stats + K + offs_k, l_q, k_mask, False)
                accumulate(stats + 2 * K + offs_k, w, k_mask, False)
            last = last_to_arrive(Tickets, slot, n_splits)
            if last:
                if EXACT_ORDER:   # the splits' partials as one tile, summed in a fixed order
                    l_p = split_sum(Parts + b * n_splits * 3 * K, n_splits, 3 * K, offs_k, k_mask, 1.0)
                    l_q = split_sum(Parts + b * n_splits * 3 * K + K, n_splits, 3 * K, offs_k, k_mask, 1.0)
                    w = split_sum(Parts + b * n_splits * 3 * K + 2 * K, n_splits, 3 * K, offs_k, k_mask, 0.0)
                else:
                    l_p = tl.load(stats + offs_k, mask=k_mask, other=1.0, cache_modifier=".cg")
                    l_q = tl.load(stats + K + offs_k, mask=k_mask, other=1.0, cache_modifier=".cg")
                    w = tl.load(stats + 2 * K + offs_k, mask=k_mask, other=0.0, cache_modifier=".cg")
        else:
            last = True
        if last:
            kl = tl.where(k_mask, w / l_q - tl.log(l_q / l_p), 0.0)
            tl.store(stats + offs_k, l_p, mask=k_mask)
            tl.store(stats + K + offs_k, l_q, mask=k_mask)
            tl.store(stats + 2 * K + offs_k, kl, mask=k_mask)
            add_loss(Loss, slot, tl.sum(kl, axis=0) * inv_b, EXACT_ORDER)

    @triton.jit
    def _sim_fwd_kernel(
        Tok, TokDv, Text, Stats, TextNorm, Loss, Parts, Tickets,
        stride_tb, stride_tp, stride_te,
        stride_vb, stride_vp, stride_ve,
        stride_xk, stride_xe,
        P, E, K, n_full_k, n_blocks, blocks_per_program, inv_b, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        TAIL_K: tl.constexpr, TAIL_TENSOR_CORES: tl.constexpr, FMA_E: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        k_program = tl.program_id(1)
        Tok += b * stride_tb
        TokDv += b * stride_vb
        if k_program < n_full_k:
            _sim_fwd_classes(Tok, TokDv, Text, Stats, TextNorm, Loss, Parts, Tickets, stride_tp,
                             stride_te, stride_vp, stride_ve, stride_xk, stride_xe, b,
                             k_program * BLOCK_K, P, E, K, n_blocks, blocks_per_program, inv_b, eps,
                             BLOCK_P, BLOCK_K, BLOCK_E, True, SPLIT, PRECISION, EXACT_ORDER)
        else:
            _sim_fwd_classes(Tok, TokDv, Text, Stats, TextNorm, Loss, Parts, Tickets, stride_tp,
                             stride_te, stride_vp, stride_ve, stride_xk, stride_xe, b,
                             n_full_k * BLOCK_K, P, E, K, n_blocks, blocks_per_program, inv_b, eps,
                             BLOCK_P, TAIL_K, BLOCK_E if TAIL_TENSOR_CORES else FMA_E,
                             TAIL_TENSOR_CORES, SPLIT, PRECISION, EXACT_ORDER)

    @triton.jit
    def score_gradients(s, s_dv, Stats, offs_k, k_mask, p_mask, K, g):
        """dS, dS_dv of a [patches, classes] tile from the forward's (l_p, l_q, KL)."""
        l_p = tl.load(Stats + offs_k, mask=k_mask, other=1.0)
        l_q = tl.load(Stats + K + offs_k, mask=k_mask, other=1.0)
        kl = tl.load(Stats + 2 * K + offs_k, mask=k_mask, other=0.0)
        valid = p_mask[:, None] & k_mask[None, :]
        q = tl.exp(s_dv - 1.0) / l_q[None, :]
        ds = tl.where(valid, g * (tl.exp(s - 1.0) / l_p[None, :] - q), 0.0)
        log_ratio = s_dv - s - tl.log(l_q / l_p)[None, :]
        ds_dv = tl.where(valid, g * q * (log_ratio - kl[None, :]), 0.0)
        return ds, ds_dv

    @triton.jit
    def held_rows(Tok, stride_tp, stride_te, offs_p, p_mask, offs_e, e_mask, inv_nu):
        """û of a block of token rows over some columns, fp32."""
        u = tl.load(Tok + offs_p[:, None] * stride_tp + offs_e[None, :] * stride_te,
                    mask=p_mask[:, None] & e_mask[None, :], other=0.0)
        return u.to(tl.float32) * inv_nu[:, None]

    @triton.jit
    def text_grad_by_class(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, GText, ds,
                           ds_dv, offs_p, p_mask, offs_e, e_mask, inv_nu, inv_nu_dv, k0, n_classes,
                           K, E, BLOCK_K: tl.constexpr, EXACT_ORDER: tl.constexpr):
        """GText[k0 + j, offs_e] += Σ_n dS_nj û_n + dS_dv,nj û_dv,n, one class at a time on CUDA
        cores (fp32 and the class tail: no three-pass TF32 operand splits in registers)."""
        cols = tl.arange(0, BLOCK_K)
        u_hat = held_rows(Tok, stride_tp, stride_te, offs_p, p_mask, offs_e, e_mask, inv_nu)
        u_dv_hat = held_rows(TokDv, stride_vp, stride_ve, offs_p, p_mask, offs_e, e_mask, inv_nu_dv)
        for j in range(0, n_classes):
            col = tl.sum(tl.where(cols[None, :] == j, ds, 0.0), axis=1)
            col_dv = tl.sum(tl.where(cols[None, :] == j, ds_dv, 0.0), axis=1)
            grad_hat = gemv_t(u_hat, col) + gemv_t(u_dv_hat, col_dv)
            accumulate(GText + (k0 + j) * E + offs_e, grad_hat, e_mask & (k0 + j < K), EXACT_ORDER)

    @triton.jit
    def _sim_bwd_classes(
        acc, acc_dv, r, r_dv, Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, Text,
        stride_xk, stride_xe, TextNorm, Stats, GText, offs_p, p_mask, offs_e, e_mask, inv_nu,
        inv_nu_dv, first_pass, k0, K, E, g, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        TENSOR_CORES: tl.constexpr, PRECISION: tl.constexpr, TEXT_GRAD: tl.constexpr,
        TEXT_GRAD_TENSOR_CORES: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        """One block of classes: S tiles streamed over all of E, then dû[:, offs_e] += dS t̂ into
        the accumulators (on tensor cores, or one rank-one update per class for a tail below
        16); r = Σ_c dS S on the first pass over E only. With TEXT_GRAD, the unprojected
        d t̂[:, offs_e] = dSᵀ û is added into GText."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        nt = tl.load(TextNorm + offs_k, mask=k_mask, other=1.0)
        inv_nt = tl.where(k_mask, inv_norm(nt * nt, eps), 0.0)
        s, s_dv = cosine_tiles(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, Text,
                               stride_xk, stride_xe, offs_p, p_mask, offs_k, k_mask, E, inv_nt, eps,
                               BLOCK_P, BLOCK_K, BLOCK_E, TENSOR_CORES, PRECISION)
        ds, ds_dv = score_gradients(s, s_dv, Stats, offs_k, k_mask, p_mask, K, g)
        r += tl.where(first_pass, tl.sum(ds * s, axis=1), 0.0)
        r_dv += tl.where(first_pass, tl.sum(ds_dv * s_dv, axis=1), 0.0)
        if TENSOR_CORES:
            t = tl.load(Text + offs_k[:, None] * stride_xk + offs_e[None, :] * stride_xe,
                        mask=k_mask[:, None] & e_mask[None, :], other=0.0)
            # dû = dS · t̂ = (dS ⊙ 1/‖t‖) · t: scale the small tile, multiply the raw text
            acc += tl.dot((ds * inv_nt[None, :]).to(t.dtype), t, input_precision=PRECISION)
            acc_dv += tl.dot((ds_dv * inv_nt[None, :]).to(t.dtype), t, input_precision=PRECISION)
            if TEXT_GRAD and TEXT_GRAD_TENSOR_CORES:
                u_hat = held_rows(Tok, stride_tp, stride_te, offs_p, p_mask, offs_e, e_mask, inv_nu)
                grad_hat = tl.dot(tl.trans(ds).to(t.dtype), u_hat.to(t.dtype), input_precision=PRECISION)
                u_hat = held_rows(TokDv, stride_vp, stride_ve, offs_p, p_mask, offs_e, e_mask, inv_nu_dv)
                grad_hat += tl.dot(tl.trans(ds_dv).to(t.dtype), u_hat.to(t.dtype),
                                   input_precision=PRECISION)
                accumulate(GText + offs_k[:, None] * E + offs_e[None, :], grad_hat,
                           k_mask[:, None] & e_mask[None, :], EXACT_ORDER)
            elif TEXT_GRAD:
                text_grad_by_class(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, GText, ds,
                                   ds_dv, offs_p, p_mask, offs_e, e_mask, inv_nu, inv_nu_dv, k0,
                                   BLOCK_K, K, E, BLOCK_K, EXACT_ORDER)
        else:
            cols = tl.arange(0, BLOCK_K)
            for j in range(0, K - k0):
                t_row = tl.load(Text + (k0 + j) * stride_xk + offs_e * stride_xe, mask=e_mask, other=0.0)
                inv_nt_j = tl.sum(tl.where(cols == j, inv_nt, 0.0), axis=0)
                acc = outer_fma(acc, tl.sum(tl.where(cols[None, :] == j, ds, 0.0), axis=1) * inv_nt_j,
                                t_row)
                acc_dv = outer_fma(acc_dv, tl.sum(tl.where(cols[None, :] == j, ds_dv, 0.0), axis=1)
                                   * inv_nt_j, t_row)
            if TEXT_GRAD:
                text_grad_by_class(Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve, GText, ds,
                                   ds_dv, offs_p, p_mask, offs_e, e_mask, inv_nu, inv_nu_dv, k0,
                                   K - k0, K, E, BLOCK_K, EXACT_ORDER)
        return acc, acc_dv, r, r_dv

    @triton.jit
    def row_norms(Tok, stride_tp, stride_te, offs_p, p_mask, E, BLOCK_P: tl.constexpr,
                  BLOCK_E: tl.constexpr):
        """‖u_n‖ of a block of rows, streamed over E."""
        uu = tl.zeros([BLOCK_P], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            u = tl.load(Tok + offs_p[:, None] * stride_tp + offs_e[None, :] * stride_te,
                        mask=p_mask[:, None] & (offs_e < E)[None, :], other=0.0).to(tl.float32)
            uu += tl.sum(u * u, axis=1)
        return tl.sqrt(uu)

    @triton.jit
    def _sim_bwd_rows(
        p0, Tok, TokDv, Text, Stats, TextNorm, DTok, DTokDv, GText, stride_tp, stride_te, stride_vp,
        stride_ve, stride_xk, stride_xe, stride_db, stride_dp, b, P, E, K, n_full_k, g, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        ACC_E: tl.constexpr, E_PAD: tl.constexpr, TAIL_K: tl.constexpr,
        TAIL_TENSOR_CORES: tl.constexpr, FMA_E: tl.constexpr, PRECISION: tl.constexpr,
        TEXT_GRAD: tl.constexpr, TEXT_GRAD_TENSOR_CORES: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        """d tokens of both paths for the BLOCK_P patch rows from p0 (d t̂ added into GText)."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        nu = row_norms(Tok, stride_tp, stride_te, offs_p, p_mask, E, BLOCK_P, BLOCK_E)
        nu_dv = row_norms(TokDv, stride_vp, stride_ve, offs_p, p_mask, E, BLOCK_P, BLOCK_E)
        inv_nu = inv_norm(nu * nu, eps)
        inv_nu_dv = inv_norm(nu_dv * nu_dv, eps)
        r = tl.zeros([BLOCK_P], tl.float32)
        r_dv = tl.zeros([BLOCK_P], tl.float32)
        # The accumulators cover ACC_E columns; wider E takes several passes over the classes
        # (S recomputed each time), r = Σ_c dS S is complete after the first.
        for e_lo in range(0, E_PAD, ACC_E):
            offs_e = e_lo + tl.arange(0, ACC_E)
            e_mask = offs_e < E
            first_pass = e_lo == 0
            acc = tl.zeros([BLOCK_P, ACC_E], tl.float32)
            acc_dv = tl.zeros([BLOCK_P, ACC_E], tl.float32)
            for kb in range(0, n_full_k):
                acc, acc_dv, r, r_dv = _sim_bwd_classes(
                    acc, acc_dv, r, r_dv, Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve,
                    Text, stride_xk, stride_xe, TextNorm, Stats, GText, offs_p, p_mask, offs_e,
                    e_mask, inv_nu, inv_nu_dv, first_pass, kb * BLOCK_K, K, E, g, eps, BLOCK_P,
                    BLOCK_K, BLOCK_E, True, PRECISION, TEXT_GRAD, TEXT_GRAD_TENSOR_CORES, EXACT_ORDER)
            if TAIL_K > 0:
                acc, acc_dv, r, r_dv = _sim_bwd_classes(
                    acc, acc_dv, r, r_dv, Tok, stride_tp, stride_te, TokDv, stride_vp, stride_ve,
                    Text, stride_xk, stride_xe, TextNorm, Stats, GText, offs_p, p_mask, offs_e,
                    e_mask, inv_nu, inv_nu_dv, first_pass, n_full_k * BLOCK_K, K, E, g, eps,
                    BLOCK_P, TAIL_K, BLOCK_E if TAIL_TENSOR_CORES else FMA_E, TAIL_TENSOR_CORES,
                    PRECISION, TEXT_GRAD, TEXT_GRAD_TENSOR_CORES, EXACT_ORDER)
            mask = p_mask[:, None] & e_mask[None, :]
            out = b * stride_db + offs_p[:, None] * stride_dp + offs_e[None, :]
            u_hat = held_rows(Tok, stride_tp, stride_te, offs_p, p_mask, offs_e, e_mask, inv_nu)
            du = (acc - u_hat * tl.where(nu >= eps, r, 0.0)[:, None]) * inv_nu[:, None]
            tl.store(DTok + out, du.to(DTok.dtype.element_ty), mask=mask)
            u_hat = held_rows(TokDv, stride_vp, stride_ve, offs_p, p_mask, offs_e, e_mask, inv_nu_dv)
            du = (acc_dv - u_hat * tl.where(nu_dv >= eps, r_dv, 0.0)[:, None]) * inv_nu_dv[:, None]
            tl.store(DTokDv + out, du.to(DTokDv.dtype.element_ty), mask=mask)

    @triton.jit
    def _sim_bwd_kernel(
        Tok, TokDv, Text, Stats, TextNorm, DLoss, DTok, DTokDv, GText,
        stride_tb, stride_tp, stride_te,
        stride_vb, stride_vp, stride_ve,
        stride_xk, stride_xe,
        stride_db, stride_dp,
        P, E, K, n_full_k, inv_b, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        ACC_E: tl.constexpr, E_PAD: tl.constexpr, TAIL_K: tl.constexpr,
        TAIL_TENSOR_CORES: tl.constexpr, FMA_E: tl.constexpr, PRECISION: tl.constexpr,
        TEXT_GRAD: tl.constexpr, TEXT_GRAD_TENSOR_CORES: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        g = tl.load(DLoss).to(tl.float32) * inv_b
        Tok += b * stride_tb
        TokDv += b * stride_vb
        Stats += b * 3 * K
        if EXACT_ORDER:   # d t̂ of this image alone, [B, K, E], summed over images afterwards
            GText += b * K * E
        # One patch block a program, or (EXACT_ORDER: one program an image) all of them in order.
        if EXACT_ORDER:
            for p0 in range(0, P, BLOCK_P):
                _sim_bwd_rows(p0, Tok, TokDv, Text, Stats, TextNorm, DTok, DTokDv, GText, stride_tp,
                              stride_te, stride_vp, stride_ve, stride_xk, stride_xe, stride_db, stride_dp,
                              b, P, E, K, n_full_k, g, eps, BLOCK_P, BLOCK_K, BLOCK_E, ACC_E, E_PAD,
                              TAIL_K, TAIL_TENSOR_CORES, FMA_E, PRECISION, TEXT_GRAD,
                              TEXT_GRAD_TENSOR_CORES, EXACT_ORDER)
        else:
            _sim_bwd_rows(tl.program_id(1) * BLOCK_P, Tok, TokDv, Text, Stats, TextNorm, DTok, DTokDv,
                          GText, stride_tp, stride_te, stride_vp, stride_ve, stride_xk, stride_xe,
                          stride_db, stride_dp, b, P, E, K, n_full_k, g, eps, BLOCK_P, BLOCK_K, BLOCK_E,
                          ACC_E, E_PAD, TAIL_K, TAIL_TENSOR_CORES, FMA_E, PRECISION, TEXT_GRAD,
                          TEXT_GRAD_TENSOR_CORES, EXACT_ORDER)

    @triton.jit
    def _text_normalize_bwd_kernel(Text, TextNorm, GText, DText, stride_xk, stride_xe, K, E, eps,
                                   BLOCK_K: tl.constexpr, E_PAD: tl.constexpr):
        """d text = the normalisation's backward of the accumulated d t̂, BLOCK_K rows a program."""
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_e = tl.arange(0, E_PAD)
        k_mask = offs_k < K
        mask = k_mask[:, None] & (offs_e < E)[None, :]
        nt = tl.load(TextNorm + offs_k, mask=k_mask, other=1.0)
        inv_nt = inv_norm(nt * nt, eps)
        t_hat = tl.load(Text + offs_k[:, None] * stride_xk + offs_e[None, :] * stride_xe, mask=mask,
                        other=0.0).to(tl.float32) * inv_nt[:, None]
        grad_hat = tl.load(GText + offs_k[:, None] * E + offs_e[None, :], mask=mask, other=0.0)
        dt = normalize_backward(grad_hat, t_hat, nt, inv_nt, eps)
        tl.store(DText + offs_k[:, None] * E + offs_e[None, :], dt.to(DText.dtype.element_ty),
                 mask=mask)


def _sim_fwd(tokens, tokens_dv, text, exact_order=False, config=None):
    """(loss, per-(image, class) statistics [B, 3, K] fp32: l_p, l_q, KL; ‖t_c‖ [K] fp32)."""
    b, p, e = tokens.shape
    k = text.shape[0]
    dev = tokens.device
    config = config or similarity_configs(e, tokens.dtype, dev)[0]
    full, _, tail, tail_tc = _class_split(k, config["BLOCK_K"])
    k_programs = full + (tail > 0)
    n_blocks = triton.cdiv(p, config["BLOCK_P"])
    splits, per_program = split_blocks(b * k_programs, n_blocks, dev)
    split = splits > 1
    f32 = dict(dtype=torch.float32, device=dev)
    stats = (torch.zeros if split and not exact_order else torch.empty)((b, 3, k), **f32)
    parts = torch.empty((b, splits, 3, k), **f32) if split and exact_order else placeholder(dev)
    text_norm = torch.empty((k,), **f32)
    loss = loss_buffer(b * k_programs, dev, exact_order)
    tickets = torch.zeros((b * k_programs,), dtype=torch.int32, device=dev)
    with on_device(tokens):
        _sim_fwd_kernel[(b, k_programs, splits)](
            Tok=tokens, TokDv=tokens_dv, Text=text, Stats=stats, TextNorm=text_norm, Loss=loss,
            Parts=parts, Tickets=tickets,
            stride_tb=tokens.stride(0), stride_tp=tokens.stride(1), stride_te=tokens.stride(2),
            stride_vb=tokens_dv.stride(0), stride_vp=tokens_dv.stride(1), stride_ve=tokens_dv.stride(2),
            stride_xk=text.stride(0), stride_xe=text.stride(1),
            P=p, E=e, K=k, n_full_k=full, n_blocks=n_blocks, blocks_per_program=per_program,
            inv_b=1.0 / b, eps=EPS, TAIL_K=max(tail, 1), TAIL_TENSOR_CORES=tail_tc, FMA_E=FMA_E,
            SPLIT=split, PRECISION=dot_precision(tokens), EXACT_ORDER=exact_order, **config.kwargs,
        )
    return loss_total(loss, exact_order), stats, text_norm


def _sim_bwd(dloss, tokens, tokens_dv, text, stats, text_norm, text_grad, exact_order=False, config=None):
    """(d tokens, d tokens_dv, d text fp32 or None); d text takes a second, K-row launch.

    `exact_order` with d text: one program an image walks its patch blocks in order and adds
    into a d t̂ of the image's own ([B, K, E] fp32), summed over images before the second launch."""
    b, p, e = tokens.shape
    k = text.shape[0]
    dev = tokens.device
    config = config or similarity_configs(e, tokens.dtype, dev, text_grad, exact_order)[1]
    full, _, tail, tail_tc = _class_split(k, config["BLOCK_K"])
    dtok = torch.empty((b, p, e), dtype=tokens.dtype, device=dev)
    dtok_dv = torch.empty_like(dtok)
    exact_order = exact_order and text_grad
    if text_grad:
        grad_hat = torch.zeros((b, k, e) if exact_order else (k, e), dtype=torch.float32, device=dev)
    else:
        grad_hat = placeholder(dev)
    with on_device(tokens):
        _sim_bwd_launches(tokens, tokens_dv, text, stats, text_norm, dloss, dtok, dtok_dv, grad_hat, full, tail,
                          tail_tc, text_grad, exact_order, config)
        if not text_grad:
            return dtok, dtok_dv, None
        return dtok, dtok_dv, _text_grad(text, text_norm, grad_hat.sum(0) if exact_order else grad_hat)


def _sim_bwd_launches(tokens, tokens_dv, text, stats, text_norm, dloss, dtok, dtok_dv, grad_hat, full, tail,
                      tail_tc, text_grad, exact_order, config):
    b, p, e = tokens.shape
    k = text.shape[0]
    _sim_bwd_kernel[(b, 1 if exact_order else triton.cdiv(p, config["BLOCK_P"]))](
        Tok=tokens, TokDv=tokens_dv, Text=text, Stats=stats, TextNorm=text_norm, DLoss=dloss,
        DTok=dtok, DTokDv=dtok_dv, GText=grad_hat,
        stride_tb=tokens.stride(0), stride_tp=tokens.stride(1), stride_te=tokens.stride(2),
        stride_vb=tokens_dv.stride(0), stride_vp=tokens_dv.stride(1), stride_ve=tokens_dv.stride(2),
        stride_xk=text.stride(0), stride_xe=text.stride(1),
        stride_db=dtok.stride(0), stride_dp=dtok.stride(1),
        P=p, E=e, K=k, n_full_k=full, inv_b=1.0 / b, eps=EPS, E_PAD=next_pow2(e), TAIL_K=tail,
        TAIL_TENSOR_CORES=tail_tc, FMA_E=FMA_E, PRECISION=dot_precision(tokens),
        TEXT_GRAD=text_grad, TEXT_GRAD_TENSOR_CORES=dot_precision(tokens) != "tf32x3",
        EXACT_ORDER=exact_order, **config.kwargs,
    )


def _text_grad(text, text_norm, grad_hat):
    """d text [K, E] fp32: the normalisation's backward of the summed d t̂, a launch of its own."""
    k, e = text.shape
    dtext = torch.empty((k, e), dtype=torch.float32, device=text.device)
    rows = max(1, 2048 // next_pow2(e))
    _text_normalize_bwd_kernel[(triton.cdiv(k, rows),)](
        Text=text, TextNorm=text_norm, GText=grad_hat, DText=dtext, stride_xk=text.stride(0),
        stride_xe=text.stride(1), K=k, E=e, eps=EPS, BLOCK_K=rows, E_PAD=next_pow2(e),
    )
    return dtext


@torch.library.custom_op("alignclip::similarity_align_loss", mutates_args=())
def _sim_op(tokens: Tensor, tokens_dv: Tensor, text: Tensor, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _sim_fwd(tokens, tokens_dv, text, exact_order)


@_sim_op.register_fake
def _(tokens, tokens_dv, text, exact_order):
    f32 = dict(dtype=torch.float32)
    return (tokens.new_empty((), **f32), tokens.new_empty((tokens.shape[0], 3, text.shape[0]), **f32),
            tokens.new_empty((text.shape[0],), **f32))


@torch.library.custom_op("alignclip::similarity_align_loss_backward", mutates_args=())
def _sim_bwd_op(dloss: Tensor, tokens: Tensor, tokens_dv: Tensor, text: Tensor, stats: Tensor,
                text_norm: Tensor, text_grad: bool, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    dtok, dtok_dv, dtext = _sim_bwd(dloss, tokens, tokens_dv, text, stats, text_norm, text_grad, exact_order)
    return dtok, dtok_dv, (dtext.to(text.dtype) if text_grad else text.new_empty(0))


@_sim_bwd_op.register_fake
def _(dloss, tokens, tokens_dv, text, stats, text_norm, text_grad, exact_order):
    return (torch.empty_like(tokens), torch.empty_like(tokens),
            text.new_empty(text.shape if text_grad else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output[1:])
    ctx.exact_order = inputs[3]


def _backward(ctx, dloss, _d_stats, _d_inv_nt):
    refuse_double_backward("similarity_align_loss")
    tokens, tokens_dv, text, stats, text_norm = ctx.saved_tensors
    text_grad = ctx.needs_input_grad[2]
    dtok, dtok_dv, dtext = _sim_bwd_op(dloss, tokens, tokens_dv, text, stats, text_norm, text_grad,
                                       ctx.exact_order)
    return dtok, dtok_dv, (dtext if text_grad else None), None


_sim_op.register_autograd(_backward, setup_context=_setup_context)


def _check(tokens, tokens_dv, text):
    _checks.tensor("tokens", tokens, 3, "[B, P, E]")
    _checks.tensor("tokens_dv", tokens_dv, 3, "[B, P, E]")
    _checks.tensor("text", text, 2, "[K, E]")
    _checks.same_device_dtype(tokens=tokens, tokens_dv=tokens_dv, text=text)
    if tokens_dv.shape != tokens.shape:
        raise ValueError(f"tokens_dv must have the shape of tokens [B, P, E]={tuple(tokens.shape)}, "
                         f"got {tuple(tokens_dv.shape)}")
    if min(tokens.shape) < 1 or text.shape[0] < 1:
        raise ValueError(f"tokens [B, P, E] and text [K, E] must be non-empty, got "
                         f"{tuple(tokens.shape)} and {tuple(text.shape)}")
    _checks.size("text", text.shape[1], tokens.shape[2], "width E (text.shape[1]) = tokens.shape[2]")


def similarity_align_loss(tokens, tokens_dv, text, *, deterministic=None):
    """KL(Q ‖ Pr) batchmean of the patch softmaxes of both paths' patch-to-class cosines.

    `deterministic` (default: `torch.use_deterministic_algorithms`' setting): no float atomics."""
    _check(tokens, tokens_dv, text)
    exact_order = deterministic_flag(deterministic)
    if not runs_triton(tokens):
        return loss_pytorch_path(reference.similarity_align_loss, tokens, tokens_dv, text)
    return _sim_op(tokens, tokens_dv, text, exact_order)[0]
