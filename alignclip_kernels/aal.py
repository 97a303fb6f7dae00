r"""The Attention Alignment Loss: KL(G ‖ A) over patches, with G given (`aal_kl_loss`) or computed
from the D-V tokens in the same kernels (`aal_loss`).

For cls_attn [L, B, H, N] (the CLS softmax rows of L layers) and a target G [B, P], P = N − 1:

    m_l,n = mean_h cls_attn[l, b, h, 1 + n]                      (the CLS key is dropped)
    T_l   = Σ_n m_l,n
    a_l,n = m_l,n / T_l, or 0 when T_l < tiny                    (L1 renormalisation per layer)
    A_n   = max(mean_l a_l,n, tiny)
    loss  = (1/B) Σ_b Σ_n [G_n > 0] G_n log max(G_n, tiny) − G_n log A_n

= `F.kl_div(A.log(), G, reduction="batchmean")` with 0·log 0 = 0 (tiny = fp32's smallest
normal). `aal_loss(cls_attn, tokens_dv, text, labels, temperature)` is the same loss with
G = token_text_target(tokens_dv, text, labels, temperature) (see `token_text_target.py`).

Forward, one launch over (image, split): each program reads its patch blocks of every layer as
[heads, patches] tiles, stores the head means m and (with tokens) z_n = c_n/τ, and publishes
per-layer partial sums T_l (and the partial max, Σexp of z); the last of an image's programs
computes the loss of the image and, per unit upstream gradient, the per-image sums the
backward needs:

    R_l = Σ_n (−G_n / (A_n L)) [mean_l a ≥ tiny] a_l,n,     S = Σ_n G_n ∂KL/∂G_n

Backward, one launch over (image, split), g = d loss / B, no cross-program step:

    dA_n  = −g G_n / (A_n L) · [mean_l a ≥ tiny]
    d cls_attn[l, b, h, 1 + n] = [T_l ≥ tiny] (dA_n − g R_l) / (T_l H),   d cls_attn[.., 0] = 0
    dG_n  = g ([G_n > 0] (log max(G_n, tiny) + [G_n ≥ tiny]) − log A_n)
    with tokens: dc_n = G_n (dG_n − g S) / τ, then du_n, dt as in token_text_target.

Degenerate layers (all CLS mass on the CLS key, T_l < tiny) count as a = 0 with zero gradient,
and the derivative of G log G at G = 0 is taken as 0, both as `reference.aal_kl_loss`.
Necessary multiply-adds: none for the KL; B·P·E for G's cosines (B·P·E more for d(text)).
"""
import torch
from torch import Tensor

from . import _checks, reference
from ._runtime import HAS_TRITON, cuda_arch, deterministic_flag, loss_pytorch_path, next_pow2, on_device, runs_triton
from .kernel_utils import LaunchConfig, loss_buffer, loss_total, placeholder, refuse_double_backward, split_blocks
from .paper import TEMPERATURE
from .token_text_target import _check as _check_target
from .token_text_target import combined_text_grads, text_row_grads

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernel_utils import add_loss, combine_logsumexp, last_to_arrive, split_block
    from .token_text_target import cosine_backward, label_row, row_cosines, text_grad_row, text_inv_norm

TINY = reference.TINY
EPS = reference.NORM_EPS


def aal_config(n_heads, e, device):
    block_h = min(32, next_pow2(n_heads))
    if cuda_arch(device) is None:
        return LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_P=16, BLOCK_H=block_h,
                               BLOCK_E=min(32, next_pow2(e)))
    # 32 x 64 token tiles: spill-free under both Triton 3.6's and 3.8's ptxas for every dtype on
    # both architectures; of the 4-warp tiles 16..64 x 32..128 only 32 x 128 is too (ptxas report).
    return LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_P=32, BLOCK_H=block_h,
                           BLOCK_E=min(64, next_pow2(e)))


def _stats_width(n_layers):
    """Per-image statistics the forward leaves for the backward: M, Z, S, T_0.., R_0.."""
    return 3 + 2 * n_layers


if HAS_TRITON:

    @triton.jit
    def head_mean(Attn, stride_ah, stride_an, offs_p, p_mask, H, BLOCK_H: tl.constexpr):
        """m_n = mean_h attn[h, 1 + n] for a block of patches, read as [heads, patches] tiles."""
        total = tl.zeros(offs_p.shape, tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            tile = tl.load(Attn + offs_h[:, None] * stride_ah + (offs_p[None, :] + 1) * stride_an,
                           mask=(offs_h < H)[:, None] & p_mask[None, :], other=0.0)
            total += tl.sum(tile.to(tl.float32), axis=0)
        return total / H

    @triton.jit
    def layer_value(vec, offs_l, layer):
        """vec[layer] of a register vector indexed by offs_l."""
        return tl.sum(tl.where(offs_l == layer, vec, 0.0), axis=0)

    @triton.jit
    def layer_fraction(m, total, tiny):
        """a = m / T, or 0 for a degenerate layer (T < tiny)."""
        return tl.where(total >= tiny, m / tl.where(total >= tiny, total, 1.0), 0.0)

    @triton.jit
    def attention_mean(Mean, P, offs_p, p_mask, totals, offs_l, L, tiny):
        """A_n unclamped: mean over layers of the renormalised head means stored in Mean[l, n]."""
        acc = tl.zeros(offs_p.shape, tl.float32)
        for layer in range(0, L):
            m = tl.load(Mean + layer * P + offs_p, mask=p_mask, other=0.0, cache_modifier=".cg")
            acc += layer_fraction(m, layer_value(totals, offs_l, layer), tiny)
        return acc / L

    @triton.jit
    def target_values(Target, stride_gb, stride_gp, Z, b, P, offs_p, p_mask, m_z, l_z, label_ok,
                      FROM_TOKENS: tl.constexpr):
        """G_n of a block: from z and the image's (max, Σexp), or loaded from the given target."""
        if FROM_TOKENS:
            z = tl.load(Z + b * P + offs_p, mask=p_mask, other=float("-inf"), cache_modifier=".cg")
            g = tl.where(label_ok, tl.exp(z - m_z) / l_z, float("nan"))
        else:
            g = tl.load(Target + b * stride_gb + offs_p * stride_gp, mask=p_mask,
                        other=0.0).to(tl.float32)
        return tl.where(p_mask, g, 0.0)

    @triton.jit
    def kl_gradient_unit(g, a_clamped, tiny):
        """∂KL/∂G_n per unit upstream gradient (0·log 0 = 0, with zero slope at G = 0)."""
        return tl.where(g > 0, tl.log(tl.maximum(g, tiny)) + tl.where(g >= tiny, 1.0, 0.0), 0.0) \
            - tl.log(a_clamped)

    @triton.jit
    def _aal_fwd_kernel(
        Attn, Target, Tok, Text, Labels, Loss, Mean, Z, RowStats, Partial, Stats, Tickets,
        stride_al, stride_ab, stride_ah, stride_an,
        stride_gb, stride_gp,
        stride_tb, stride_tp, stride_te,
        stride_xk, stride_xe,
        L, H, P, E, K, n_blocks, blocks_per_program, inv_b, inv_temp, eps, tiny,
        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_L: tl.constexpr, FROM_TOKENS: tl.constexpr, SPLIT: tl.constexpr,
        EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        offs_l = tl.arange(0, BLOCK_L)
        Mean += b * L * P
        label_ok = True
        if FROM_TOKENS:
            y, label_ok = label_row(Labels, b, K)
            Text_row = Text + y * stride_xk
            inv_nt, _ = text_inv_norm(Text_row, stride_xe, E, eps, BLOCK_E)
        m_z = float("-inf")
        l_z = 0.0
        if FROM_TOKENS:
            for i in range(0, blocks_per_program):
                # Offsets inside the branch, not from split_block: computed before it, they made
                # Triton 3.6's ptxas spill the fp32 kernel on sm_90a (ptxas report).
                block = split * blocks_per_program + i
                if block < n_blocks:
                    offs_p = block * BLOCK_P + tl.arange(0, BLOCK_P)
                    p_mask = offs_p < P
                    c, nu = row_cosines(Tok + b * stride_tb, stride_tp, stride_te, Text_row,
                                        stride_xe, offs_p, p_mask, E, inv_nt, eps, BLOCK_P, BLOCK_E)
                    z = tl.where(p_mask, c * inv_temp, float("-inf"))
                    tl.store(Z + b * P + offs_p, z, mask=p_mask)
                    tl.store(RowStats + (b * P + offs_p) * 2, c, mask=p_mask)
                    tl.store(RowStats + (b * P + offs_p) * 2 + 1, nu, mask=p_mask)
                    m_new = tl.maximum(m_z, tl.max(z, axis=0))
                    l_z = l_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                    m_z = m_new
        width = 2 + L
        part = Partial + (b * n_splits + split) * width
        tl.store(part, m_z)
        tl.store(part + 1, l_z)
        # Layer-outer, with a scalar total per layer: a [BLOCK_L] vector updated inside the
        # block loop made ptxas 12.9 spill at the default tiles (ptxas report).
        for layer in range(0, L):
            total = 0.0
            for i in range(0, blocks_per_program):
                valid, offs_p, p_mask = split_block(split, i, blocks_per_program, n_blocks, P, BLOCK_P)
                if valid:
                    m = head_mean(Attn + layer * stride_al + b * stride_ab, stride_ah, stride_an,
                                  offs_p, p_mask, H, BLOCK_H)
                    tl.store(Mean + layer * P + offs_p, m, mask=p_mask)
                    total += tl.sum(m, axis=0)
            tl.store(part + 2 + layer, total)
        if SPLIT:
            last = last_to_arrive(Tickets, b, n_splits)
        else:
            tl.debug_barrier()
            last = True
        if last:
            parts = Partial + b * n_splits * width
            if FROM_TOKENS:
                m_z, l_z = combine_logsumexp(parts, n_splits, width)
            offs_s = tl.arange(0, 16)
            totals = tl.sum(tl.load(parts + offs_s[:, None] * width + 2 + offs_l[None, :],
                                    mask=(offs_s < n_splits)[:, None] & (offs_l < L)[None, :],
                                    other=0.0, cache_modifier=".cg"), axis=0)
            kl = 0.0
            s_unit = 0.0
            r_unit = tl.zeros([BLOCK_L], tl.float32)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                p_mask = offs_p < P
                g = target_values(Target, stride_gb, stride_gp, Z, b, P, offs_p, p_mask, m_z, l_z,
                                  label_ok, FROM_TOKENS)
                a_mean = attention_mean(Mean, P, offs_p, p_mask, totals, offs_l, L, tiny)
                a_clamped = tl.maximum(a_mean, tiny)
                g_log_g = tl.where(g > 0, g * tl.log(tl.maximum(g, tiny)), 0.0)
                kl += tl.sum(tl.where(p_mask, g_log_g - g * tl.log(a_clamped), 0.0), axis=0)
                s_unit += tl.sum(g * kl_gradient_unit(g, a_clamped, tiny), axis=0)
                da_unit = tl.where(p_mask & (a_mean >= tiny), -g / a_clamped, 0.0) / L
                for layer in range(0, L):
                    m = tl.load(Mean + layer * P + offs_p, mask=p_mask, other=0.0, cache_modifier=".cg")
                    a = layer_fraction(m, layer_value(totals, offs_l, layer), tiny)
                    r_unit += tl.where(offs_l == layer, tl.sum(da_unit * a, axis=0), 0.0)
            stats = Stats + b * (3 + 2 * L)
            tl.store(stats, m_z)
            tl.store(stats + 1, l_z)
            tl.store(stats + 2, s_unit)
            tl.store(stats + 3 + offs_l, totals, mask=offs_l < L)
            tl.store(stats + 3 + L + offs_l, r_unit, mask=offs_l < L)
            add_loss(Loss, b, tl.where(label_ok, kl, float("nan")) * inv_b, EXACT_ORDER)

    @triton.jit
    def _aal_bwd_kernel(
        Tok, Text, Labels, Target, Mean, Z, RowStats, Stats, DLoss, DAttn, DTarget, DTok, DText,
        stride_gb, stride_gp,
        stride_tb, stride_tp, stride_te,
        stride_xk, stride_xe,
        stride_dl, stride_db, stride_dh, stride_dn,
        stride_dtb, stride_dtp, stride_dte,
        L, H, P, E, K, n_blocks, blocks_per_program, inv_b, inv_temp, eps, tiny,
        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_L: tl.constexpr, FROM_TOKENS: tl.constexpr, TARGET_GRAD: tl.constexpr,
        TEXT_GRAD: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs_l = tl.arange(0, BLOCK_L)
        up = tl.load(DLoss).to(tl.float32) * inv_b
        stats = Stats + b * (3 + 2 * L)
        m_z = tl.load(stats)
        l_z = tl.load(stats + 1)
        s_unit = tl.load(stats + 2)
        totals = tl.load(stats + 3 + offs_l, mask=offs_l < L, other=0.0)
        r_unit = tl.load(stats + 3 + L + offs_l, mask=offs_l < L, other=0.0)
        Mean += b * L * P
        DAttn += b * stride_db
        label_ok = True
        if FROM_TOKENS:
            y, label_ok = label_row(Labels, b, K)
            Text_row = Text + y * stride_xk
            inv_nt, nt = text_inv_norm(Text_row, stride_xe, E, eps, BLOCK_E)
        if split == 0:   # the CLS key's column gets no gradient
            for layer in range(0, L):
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    tl.store(DAttn + layer * stride_dl + offs_h * stride_dh,
                             tl.zeros([BLOCK_H], tl.float32), mask=offs_h < H)
        for i in range(0, blocks_per_program):
            valid, offs_p, p_mask = split_block(split, i, blocks_per_program, n_blocks, P, BLOCK_P)
            if valid:
                g = target_values(Target, stride_gb, stride_gp, Z, b, P, offs_p, p_mask, m_z, l_z,
                                  label_ok, FROM_TOKENS)
                a_mean = attention_mean(Mean, P, offs_p, p_mask, totals, offs_l, L, tiny)
                a_clamped = tl.maximum(a_mean, tiny)
                da = up * tl.where(p_mask & (a_mean >= tiny), -g / a_clamped, 0.0) / L
                for layer in range(0, L):
                    total = layer_value(totals, offs_l, layer)
                    dm = tl.where(total >= tiny,
                                  (da - up * layer_value(r_unit, offs_l, layer))
                                  / tl.where(total >= tiny, total, 1.0), 0.0) / H
                    for h0 in range(0, H, BLOCK_H):
                        offs_h = h0 + tl.arange(0, BLOCK_H)
                        tl.store(DAttn + layer * stride_dl + offs_h[:, None] * stride_dh
                                 + (offs_p[None, :] + 1) * stride_dn,
                                 tl.broadcast_to(dm[None, :], (BLOCK_H, BLOCK_P)),
                                 mask=(offs_h < H)[:, None] & p_mask[None, :])
                dg = up * kl_gradient_unit(g, a_clamped, tiny)
                if FROM_TOKENS:
                    dc = tl.where(p_mask, g * (dg - up * s_unit) * inv_temp, 0.0)
                    c = tl.load(RowStats + (b * P + offs_p) * 2, mask=p_mask, other=0.0)
                    nu = tl.load(RowStats + (b * P + offs_p) * 2 + 1, mask=p_mask, other=1.0)
                    cosine_backward(Tok + b * stride_tb, stride_tp, stride_te, Text_row, stride_xe,
                                    DTok + b * stride_dtb, stride_dtp, stride_dte,
                                    text_grad_row(DText, y, b, split, E, EXACT_ORDER), offs_p, p_mask,
                                    dc, c, nu, E, inv_nt, nt, eps, BLOCK_P, BLOCK_E, TEXT_GRAD,
                                    EXACT_ORDER)
                elif TARGET_GRAD:
                    tl.store(DTarget + b * P + offs_p, dg, mask=p_mask)


def _aal_launch(cls_attn, target, tokens, text, labels, temperature, config, exact_order):
    """The grid and the arguments both kernels take: G given (`target`) or from the tokens."""
    n_layers, b, h, n = cls_attn.shape
    from_tokens = target is None
    e = tokens.shape[2] if from_tokens else 1
    dev = cls_attn.device
    config = config or aal_config(h, e, dev)
    n_blocks = triton.cdiv(n - 1, config["BLOCK_P"])
    splits, per_program = split_blocks(b, n_blocks, dev)
    unused = placeholder(dev)
    if from_tokens:
        given = dict(Target=unused, stride_gb=0, stride_gp=0,
                     Tok=tokens, stride_tb=tokens.stride(0), stride_tp=tokens.stride(1),
                     stride_te=tokens.stride(2),
                     Text=text, stride_xk=text.stride(0), stride_xe=text.stride(1),
                     Labels=labels, K=text.shape[0])
    else:
        given = dict(Target=target, stride_gb=target.stride(0), stride_gp=target.stride(1),
                     Tok=unused, stride_tb=0, stride_tp=0, stride_te=0,
                     Text=unused, stride_xk=0, stride_xe=0, Labels=unused, K=1)
    args = dict(
        **given,
        L=n_layers, H=h, P=n - 1, E=e, n_blocks=n_blocks, blocks_per_program=per_program,
        inv_b=1.0 / b, inv_temp=1.0 / temperature, eps=EPS, tiny=TINY,
        BLOCK_L=next_pow2(n_layers), FROM_TOKENS=from_tokens, EXACT_ORDER=exact_order, **config.kwargs,
    )
    return (b, splits), args


def _aal_fwd(cls_attn, target, tokens, text, labels, temperature, exact_order=False, config=None):
    """(loss, head means [B, L, P], z [B, P], row stats [B, P, 2], per-image stats) — the
    last four kept for the backward. `target` or (`tokens`, `text`, `labels`) is None."""
    grid, args = _aal_launch(cls_attn, target, tokens, text, labels, temperature, config, exact_order)
    n_layers, b, _, n = cls_attn.shape
    splits = grid[1]
    dev = cls_attn.device
    f32 = dict(dtype=torch.float32, device=dev)
    loss = loss_buffer(b, dev, exact_order)
    mean = torch.empty((b, n_layers, n - 1), **f32)
    z = torch.empty((b, n - 1), **f32) if args["FROM_TOKENS"] else placeholder(dev)
    row_stats = torch.empty((b, n - 1, 2), **f32) if args["FROM_TOKENS"] else placeholder(dev)
    partial = torch.empty((b, splits, 2 + n_layers), **f32)
    stats = torch.empty((b, _stats_width(n_layers)), **f32)
    tickets = torch.zeros((b,), dtype=torch.int32, device=dev)
    with on_device(cls_attn):
        _aal_fwd_kernel[grid](
            Attn=cls_attn, Loss=loss, Mean=mean, Z=z, RowStats=row_stats, Partial=partial,
            Stats=stats, Tickets=tickets,
            stride_al=cls_attn.stride(0), stride_ab=cls_attn.stride(1), stride_ah=cls_attn.stride(2),
            stride_an=cls_attn.stride(3),
            SPLIT=splits > 1, **args,
        )
    return loss_total(loss, exact_order), mean, z, row_stats, stats


def _aal_bwd(dloss, cls_attn, target, tokens, text, labels, temperature, mean, z, row_stats, stats,
             target_grad, text_grad, exact_order=False, config=None):
    """(d cls_attn [L, B, H, N] fp32, d target fp32 or None, d tokens or None, d text fp32 or None)."""
    grid, args = _aal_launch(cls_attn, target, tokens, text, labels, temperature, config, exact_order)
    from_tokens = args["FROM_TOKENS"]
    _, b, _, n = cls_attn.shape
    dev = cls_attn.device
    dattn = torch.empty(cls_attn.shape, dtype=torch.float32, device=dev)
    target_grad = target_grad and not from_tokens
    text_grad = text_grad and from_tokens
    dtarget = torch.empty((b, n - 1), dtype=torch.float32, device=dev) if target_grad else None
    dtok = torch.empty(tokens.shape, dtype=tokens.dtype, device=dev) if from_tokens else None
    dtext = text_row_grads(b, grid[1], text, exact_order) if text_grad else None
    unused = placeholder(dev)
    with on_device(cls_attn):
        _aal_bwd_kernel[grid](
            Mean=mean, Z=z, RowStats=row_stats, Stats=stats, DLoss=dloss, DAttn=dattn,
            DTarget=dtarget if target_grad else unused, DTok=dtok if from_tokens else unused,
            DText=dtext if text_grad else unused,
            stride_dl=dattn.stride(0), stride_db=dattn.stride(1), stride_dh=dattn.stride(2),
            stride_dn=dattn.stride(3),
            stride_dtb=dtok.stride(0) if from_tokens else 0,
            stride_dtp=dtok.stride(1) if from_tokens else 0,
            stride_dte=dtok.stride(2) if from_tokens else 0,
            TARGET_GRAD=target_grad, TEXT_GRAD=text_grad, **args,
        )
        if text_grad:
            dtext = combined_text_grads(dtext, labels, text.shape[0], exact_order)
    return dattn, dtarget, dtok, dtext


# -- aal_kl_loss: G given ------------------------------------------------------------------------

@torch.library.custom_op("alignclip::aal_kl_loss", mutates_args=())
def _aal_kl_op(cls_attn: Tensor, target: Tensor, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    loss, mean, _, _, stats = _aal_fwd(cls_attn, target, None, None, None, 1.0, exact_order)
    return loss, mean, stats


@_aal_kl_op.register_fake
def _(cls_attn, target, exact_order):
    n_layers, b, _, n = cls_attn.shape
    f32 = dict(dtype=torch.float32)
    return (cls_attn.new_empty((), **f32), cls_attn.new_empty((b, n_layers, n - 1), **f32),
            cls_attn.new_empty((b, _stats_width(n_layers)), **f32))


@torch.library.custom_op("alignclip::aal_kl_loss_backward", mutates_args=())
def _aal_kl_bwd_op(dloss: Tensor, cls_attn: Tensor, target: Tensor, mean: Tensor, stats: Tensor,
                   target_grad: bool) -> tuple[Tensor, Tensor]:
    unused = placeholder(cls_attn.device)
    dattn, dtarget, _, _ = _aal_bwd(dloss, cls_attn, target, None, None, None, 1.0, mean, unused,
                                    unused, stats, target_grad, False)
    return dattn.to(cls_attn.dtype), (dtarget.to(target.dtype) if target_grad else target.new_empty(0))


@_aal_kl_bwd_op.register_fake
def _(dloss, cls_attn, target, mean, stats, target_grad):
    return torch.empty_like(cls_attn), target.new_empty(target.shape if target_grad else (0,))


def _aal_kl_setup(ctx, inputs, output):
    cls_attn, target, _ = inputs
    _, mean, stats = output
    ctx.save_for_backward(cls_attn, target, mean, stats)


def _aal_kl_backward(ctx, dloss, _d_mean, _d_stats):
    refuse_double_backward("aal_kl_loss")
    cls_attn, target, mean, stats = ctx.saved_tensors
    target_grad = ctx.needs_input_grad[1]
    dattn, dtarget = _aal_kl_bwd_op(dloss, cls_attn, target, mean, stats, target_grad)
    return dattn, (dtarget if target_grad else None), None


_aal_kl_op.register_autograd(_aal_kl_backward, setup_context=_aal_kl_setup)


# -- aal_loss: G from the D-V tokens, fused ------------------------------------------------------

@torch.library.custom_op("alignclip::aal_loss", mutates_args=())
def _aal_op(cls_attn: Tensor, tokens: Tensor, text: Tensor, labels: Tensor,
            temperature: float, exact_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _aal_fwd(cls_attn, None, tokens, text, labels, temperature, exact_order)


@_aal_op.register_fake
def _(cls_attn, tokens, text, labels, temperature, exact_order):
    n_layers, b, _, n = cls_attn.shape
    f32 = dict(dtype=torch.float32)
    return (cls_attn.new_empty((), **f32), cls_attn.new_empty((b, n_layers, n - 1), **f32),
            cls_attn.new_empty((b, n - 1), **f32), cls_attn.new_empty((b, n - 1, 2), **f32),
            cls_attn.new_empty((b, _stats_width(n_layers)), **f32))


@torch.library.custom_op("alignclip::aal_loss_backward", mutates_args=())
def _aal_bwd_op(dloss: Tensor, cls_attn: Tensor, tokens: Tensor, text: Tensor, labels: Tensor,
                temperature: float, mean: Tensor, z: Tensor, row_stats: Tensor, stats: Tensor,
                text_grad: bool, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    dattn, _, dtok, dtext = _aal_bwd(dloss, cls_attn, None, tokens, text, labels, temperature, mean,
                                     z, row_stats, stats, False, text_grad, exact_order)
    return dattn.to(cls_attn.dtype), dtok, (dtext.to(text.dtype) if text_grad else text.new_empty(0))


@_aal_bwd_op.register_fake
def _(dloss, cls_attn, tokens, text, labels, temperature, mean, z, row_stats, stats, text_grad,
      exact_order):
    return (torch.empty_like(cls_attn), torch.empty_like(tokens),
            text.new_empty(text.shape if text_grad else (0,)))


def _aal_setup(ctx, inputs, output):
    cls_attn, tokens, text, labels, temperature, exact_order = inputs
    _, mean, z, row_stats, stats = output
    ctx.save_for_backward(cls_attn, tokens, text, labels, mean, z, row_stats, stats)
    ctx.temperature, ctx.exact_order = temperature, exact_order


def _aal_backward(ctx, dloss, *_unused):
    refuse_double_backward("aal_loss")
    cls_attn, tokens, text, labels, mean, z, row_stats, stats = ctx.saved_tensors
    text_grad = ctx.needs_input_grad[2]
    dattn, dtok, dtext = _aal_bwd_op(dloss, cls_attn, tokens, text, labels, ctx.temperature, mean,
                                     z, row_stats, stats, text_grad, ctx.exact_order)
    return dattn, dtok, (dtext if text_grad else None), None, None, None


_aal_op.register_autograd(_aal_backward, setup_context=_aal_setup)


def _check_attn(cls_attn):
    _checks.tensor("cls_attn", cls_attn, 4, "[L, B, H, N]")
    n_layers, b, h, n = cls_attn.shape
    if min(n_layers, b, h) < 1 or n < 2:
        raise ValueError(f"cls_attn must have L, B, H >= 1 and N >= 2 (CLS + patches), "
                         f"got {tuple(cls_attn.shape)}")
    return b, n


def _check_kl(cls_attn, target):
    b, n = _check_attn(cls_attn)
    _checks.tensor("target", target, 2, "[B, N-1]")
    _checks.same_device(cls_attn=cls_attn, target=target)
    if tuple(target.shape) != (b, n - 1):
        raise ValueError(f"target must have shape [B, N-1]=[{b}, {n - 1}] to match cls_attn "
                         f"[L, B, H, N]={tuple(cls_attn.shape)}, got {tuple(target.shape)}")


def aal_kl_loss(cls_attn, target, *, deterministic=None):
    """AAL: `F.kl_div(A.log(), target, reduction="batchmean")` with A from the CLS attention rows.

    `deterministic` (default: `torch.use_deterministic_algorithms`' setting): the loss summed
    in image order, not atomically."""
    _check_kl(cls_attn, target)
    exact_order = deterministic_flag(deterministic)
    if not runs_triton(cls_attn) or not runs_triton(target):
        return loss_pytorch_path(reference.aal_kl_loss, cls_attn, target)
    return _aal_kl_op(cls_attn, target, exact_order)[0]


def aal_loss(cls_attn, tokens, text, labels, *, temperature=TEMPERATURE, deterministic=None):
    """AAL with its target computed in the same kernels: `aal_kl_loss(cls_attn,
    token_text_target(tokens, text, labels, temperature=temperature))`, one forward and one
    backward launch. tokens: the D-V path's patch tokens [B, N-1, E]. `deterministic` as in
    `aal_kl_loss`, and d(text) without atomics."""
    b, n = _check_attn(cls_attn)
    exact_order = deterministic_flag(deterministic)
    temperature = _check_target(tokens, text, labels, temperature)
    _checks.same_device(cls_attn=cls_attn, tokens=tokens)
    if tuple(tokens.shape[:2]) != (b, n - 1):
        raise ValueError(f"tokens must have shape [B, N-1, E] with [B, N-1]=[{b}, {n - 1}] to match "
                         f"cls_attn [L, B, H, N]={tuple(cls_attn.shape)}, got {tuple(tokens.shape)}")
    if not runs_triton(cls_attn) or not runs_triton(tokens):
        return loss_pytorch_path(reference.aal_loss, cls_attn, tokens, text, labels,
                                 temperature=temperature)
    return _aal_op(cls_attn, tokens, text, labels, temperature, exact_order)[0]
