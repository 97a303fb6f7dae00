r"""Attention Alignment Loss: KL(G ‖ A) over patches (SPEC.md section 3).

    m_l  = mean_h cls_attn[l, b, h, 1:]                 (drop the CLS key)
    a_l  = m_l / Σ_n m_l, or 0 when Σ_n m_l < tiny       (L1 renormalisation per layer)
    A    = max(mean_l a_l, tiny)
    loss = (1/B) Σ_b Σ_n [G > 0] G (log max(G, tiny)) − G log A

Forward: one launch, a program per image looping over L and H (atomic add of the batch sum).
Backward: one launch; d(cls_attn) is the same for every head and zero on the CLS key:

    dA_n  = −g G_n / (B A_n) · [mean_l a_l ≥ tiny],      da_l = dA / L
    dm_l  = [Σ m_l ≥ tiny] (da_l − Σ_n da_l,n a_l,n) / Σ m_l
    d cls_attn[l, b, h, 1 + n] = dm_l,n / H
    dG_n  = g ([G_n > 0] (log max(G_n, tiny) + [G_n ≥ tiny]) − log A_n) / B
"""
import torch

from . import _checks, reference
from ._runtime import HAS_TRITON, next_pow2, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

TINY = reference.TINY


if HAS_TRITON:

    @triton.jit
    def _safe(total, tiny):
        """A denominator for the non-degenerate branch only (1 where the layer is degenerate)."""
        return tl.where(total >= tiny, total, 1.0)

    @triton.jit
    def _layer_patch_attention(A_ptr, sal, sah, san, layer, offs_p, p_mask, H, tiny):
        """Head-mean CLS attention on the patches of one layer, its sum, and its L1 renormalisation."""
        m = tl.zeros(offs_p.shape, tl.float32)
        for h in range(H):
            m += tl.load(A_ptr + layer * sal + h * sah + (offs_p + 1) * san, mask=p_mask,
                         other=0.0).to(tl.float32)
        m = m / H
        total = tl.sum(m, 0)
        return tl.where(total >= tiny, m / _safe(total, tiny), 0.0), total

    @triton.jit
    def _layer_mean(A_ptr, sal, sah, san, offs_p, p_mask, L, H, tiny):
        acc = tl.zeros(offs_p.shape, tl.float32)
        for layer in range(L):
            a, _ = _layer_patch_attention(A_ptr, sal, sah, san, layer, offs_p, p_mask, H, tiny)
            acc += a
        return acc / L

    @triton.jit
    def _aal_fwd_kernel(Attn, G, Loss, sal, sab, sah, san, sgb, sgp, L, H, P, inv_b, tiny,
                        BLOCK_P: tl.constexpr):
        b = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        a_mean = _layer_mean(Attn + b * sab, sal, sah, san, offs_p, p_mask, L, H, tiny)
        g = tl.load(G + b * sgb + offs_p * sgp, mask=p_mask, other=0.0).to(tl.float32)
        g_log_g = tl.where(g > 0, g * tl.log(tl.maximum(g, tiny)), 0.0)
        term = tl.where(p_mask, g_log_g - g * tl.log(tl.maximum(a_mean, tiny)), 0.0)
        tl.atomic_add(Loss, tl.sum(term, 0) * inv_b)

    @triton.jit
    def _aal_bwd_kernel(Attn, G, DLoss, DAttn, DG, sal, sab, sah, san, sgb, sgp,
                        dal, dab, dah, dan, dgb, L, H, P, inv_b, tiny,
                        BLOCK_P: tl.constexpr, TARGET_GRAD: tl.constexpr):
        b = tl.program_id(0)
        offs_p = tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        up = tl.load(DLoss).to(tl.float32) * inv_b
        Attn += b * sab
        a_mean = _layer_mean(Attn, sal, sah, san, offs_p, p_mask, L, H, tiny)
        a_clamped = tl.maximum(a_mean, tiny)
        g = tl.load(G + b * sgb + offs_p * sgp, mask=p_mask, other=0.0).to(tl.float32)
        if TARGET_GRAD:
            dlog = tl.where(g > 0, tl.log(tl.maximum(g, tiny)) + tl.where(g >= tiny, 1.0, 0.0), 0.0)
            tl.store(DG + b * dgb + offs_p, up * (dlog - tl.log(a_clamped)), mask=p_mask)
        da = tl.where(p_mask & (a_mean >= tiny), -up * g / a_clamped, 0.0) / L
        DAttn += b * dab
        for layer in range(L):
            a, total = _layer_patch_attention(Attn, sal, sah, san, layer, offs_p, p_mask, H, tiny)
            dm = tl.where(total >= tiny, (da - tl.sum(da * a, 0)) / _safe(total, tiny) / H, 0.0)
            for h in range(H):
                row = DAttn + layer * dal + h * dah
                tl.store(row + (offs_p + 1) * dan, dm, mask=p_mask)
                tl.store(row + offs_p * dan, tl.zeros_like(dm), mask=offs_p == 0)


class _AALKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cls_attn, target):
        n_layers, b, h, n = cls_attn.shape
        loss = torch.zeros((), dtype=torch.float32, device=cls_attn.device)
        _aal_fwd_kernel[(b,)](
            cls_attn, target, loss, *cls_attn.stride(), *target.stride(), n_layers, h, n - 1,
            1.0 / b, TINY, BLOCK_P=next_pow2(n - 1))
        ctx.save_for_backward(cls_attn, target)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        cls_attn, target = ctx.saved_tensors
        n_layers, b, h, n = cls_attn.shape
        target_grad = ctx.needs_input_grad[1]
        dattn = torch.empty((n_layers, b, h, n), dtype=cls_attn.dtype, device=cls_attn.device)
        dtarget = torch.empty((b, n - 1), dtype=torch.float32, device=target.device)
        _aal_bwd_kernel[(b,)](
            cls_attn, target, dloss, dattn, dtarget, *cls_attn.stride(), *target.stride(),
            *dattn.stride(), dtarget.stride(0), n_layers, h, n - 1, 1.0 / b, TINY,
            BLOCK_P=next_pow2(n - 1), TARGET_GRAD=target_grad)
        return dattn, dtarget.to(target.dtype) if target_grad else None


def _check(cls_attn, target):
    _checks.tensor("cls_attn", cls_attn, 4, "[L, B, H, N]")
    _checks.tensor("target", target, 2, "[B, N-1]")
    _checks.same_device(cls_attn=cls_attn, target=target)
    n_layers, b, h, n = cls_attn.shape
    if min(n_layers, b, h) < 1 or n < 2:
        raise ValueError(f"cls_attn must have L, B, H >= 1 and N >= 2 (CLS + patches), "
                         f"got {tuple(cls_attn.shape)}")
    if tuple(target.shape) != (b, n - 1):
        raise ValueError(f"target must have shape [B, N-1]=[{b}, {n - 1}] to match cls_attn "
                         f"[L, B, H, N]={tuple(cls_attn.shape)}, got {tuple(target.shape)}")


def aal_kl_loss(cls_attn, target):
    """AAL: `F.kl_div(A.log(), target, reduction="batchmean")` with A from the CLS attention rows."""
    _check(cls_attn, target)
    if not runs_triton(cls_attn):
        return reference.aal_kl_loss(cls_attn, target)
    return _AALKL.apply(cls_attn, target)
