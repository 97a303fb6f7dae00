r"""Token-text similarity target G (SPEC.md section 2).

    û_n = u_n / max(‖u_n‖, ε),  t̂ = t_y / max(‖t_y‖, ε),  c_n = û_n · t̂,
    G_n = softmax_n(c_n / τ)                                       (per image b, fp32)

Forward: one launch, a program per image holding all P patches; E is streamed in chunks.
Backward: one launch (plus a zero fill of d(text) when text needs a gradient):

    dz_n = G_n (dG_n − Σ_m G_m dG_m),   dc_n = dz_n / τ
    du_n = (dc_n t̂ − [‖u_n‖ ≥ ε] dc_n c_n û_n) / max(‖u_n‖, ε)
    dt_y += (Σ_n dc_n û_n − [‖t_y‖ ≥ ε] t̂ Σ_n dc_n c_n) / max(‖t_y‖, ε)     (atomic over b)
"""
import torch

from . import _checks, reference
from ._runtime import HAS_TRITON, next_pow2, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

EPS = reference.NORM_EPS


def _blocks(p, e):
    block_p = next_pow2(p)
    block_e = max(1, min(next_pow2(e), 8192 // block_p))
    return block_p, block_e


if HAS_TRITON:

    @triton.jit
    def _row_cosines(U, T, offs_p, p_mask, E, sue, ste, BLOCK_P: tl.constexpr,
                     BLOCK_E: tl.constexpr):
        """Dot products with t, squared norms of each u row and of t, streamed over E."""
        dot = tl.zeros([BLOCK_P], tl.float32)
        uu = tl.zeros([BLOCK_P], tl.float32)
        tt = tl.zeros([BLOCK_E], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            u = tl.load(U + offs_p[:, None] + offs_e[None, :] * sue,
                        mask=p_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
            t = tl.load(T + offs_e * ste, mask=e_mask, other=0.0).to(tl.float32)
            dot += tl.sum(u * t[None, :], 1)
            uu += tl.sum(u * u, 1)
            tt += t * t
        return dot, uu, tl.sum(tt, 0)

    @triton.jit
    def _target_fwd_kernel(
        Tok, Text, Labels, G, stb, stp, ste, sxk, sxe, sgb, P, E, inv_temp, eps,
        BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        b = tl.program_id(0)
        y = tl.load(Labels + b)
        offs_p = tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        dot, uu, tt = _row_cosines(Tok + b * stb, Text + y * sxk, offs_p * stp, p_mask, E, ste,
                                   sxe, BLOCK_P, BLOCK_E)
        cos = dot / (tl.maximum(tl.sqrt(uu), eps) * tl.maximum(tl.sqrt(tt), eps))
        z = tl.where(p_mask, cos * inv_temp, float("-inf"))
        ez = tl.exp(z - tl.max(z, 0))
        tl.store(G + b * sgb + offs_p, ez / tl.sum(ez, 0), mask=p_mask)

    @triton.jit
    def _target_bwd_kernel(
        Tok, Text, Labels, G, DG, DTok, DText, stb, stp, ste, sxk, sxe, sgb, sdgb, sdgp,
        sdtb, sdtp, P, E, inv_temp, eps,
        BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, TEXT_GRAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        y = tl.load(Labels + b)
        offs_p = tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        Tok += b * stb
        Text += y * sxk
        dot, uu, tt = _row_cosines(Tok, Text, offs_p * stp, p_mask, E, ste, sxe, BLOCK_P,
                                   BLOCK_E)
        nu = tl.sqrt(uu)
        nt = tl.sqrt(tt)
        du_den = tl.maximum(nu, eps)
        dt_den = tl.maximum(nt, eps)
        cos = dot / (du_den * dt_den)
        g = tl.load(G + b * sgb + offs_p, mask=p_mask, other=0.0)
        dg = tl.load(DG + b * sdgb + offs_p * sdgp, mask=p_mask, other=0.0).to(tl.float32)
        dc = g * (dg - tl.sum(g * dg, 0)) * inv_temp
        u_keep = tl.where(nu >= eps, 1.0, 0.0)
        t_keep = tl.where(nt >= eps, 1.0, 0.0)
        dc_cos = tl.sum(dc * cos, 0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            mask = p_mask[:, None] & e_mask[None, :]
            u_hat = tl.load(Tok + offs_p[:, None] * stp + offs_e[None, :] * ste, mask=mask,
                            other=0.0).to(tl.float32) / du_den[:, None]
            t_hat = tl.load(Text + offs_e * sxe, mask=e_mask, other=0.0).to(tl.float32) / dt_den
            du = dc[:, None] * (t_hat[None, :] - (u_keep * cos)[:, None] * u_hat) / du_den[:, None]
            tl.store(DTok + b * sdtb + offs_p[:, None] * sdtp + offs_e[None, :],
                     du.to(DTok.dtype.element_ty), mask=mask)
            if TEXT_GRAD:
                dt = (tl.sum(dc[:, None] * u_hat, 0) - t_keep * dc_cos * t_hat) / dt_den
                tl.atomic_add(DText + y * E + offs_e, dt, mask=e_mask)


class _TokenTextTarget(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, text, labels, temperature):
        b, p, e = tokens.shape
        g = torch.empty((b, p), dtype=torch.float32, device=tokens.device)
        block_p, block_e = _blocks(p, e)
        _target_fwd_kernel[(b,)](
            tokens, text, labels, g, *tokens.stride(), *text.stride(), g.stride(0), p, e,
            1.0 / temperature, EPS, BLOCK_P=block_p, BLOCK_E=block_e)
        ctx.save_for_backward(tokens, text, labels, g)
        ctx.temperature = temperature
        return g

    @staticmethod
    def backward(ctx, dg):
        tokens, text, labels, g = ctx.saved_tensors
        b, p, e = tokens.shape
        text_grad = ctx.needs_input_grad[1]
        dtok = torch.empty((b, p, e), dtype=tokens.dtype, device=tokens.device)
        dtext = (torch.zeros(text.shape, dtype=torch.float32, device=text.device) if text_grad
                 else dtok)
        block_p, block_e = _blocks(p, e)
        _target_bwd_kernel[(b,)](
            tokens, text, labels, g, dg, dtok, dtext, *tokens.stride(), *text.stride(),
            g.stride(0), *dg.stride(), dtok.stride(0), dtok.stride(1), p, e,
            1.0 / ctx.temperature, EPS, BLOCK_P=block_p, BLOCK_E=block_e, TEXT_GRAD=text_grad)
        return dtok, dtext.to(text.dtype) if text_grad else None, None, None


def _check(tokens, text, labels, temperature):
    _checks.tensor("tokens", tokens, 3, "[B, P, E]")
    _checks.tensor("text", text, 2, "[K, E]")
    _checks.same_device_dtype(tokens=tokens, text=text)
    b, p, e = tokens.shape
    if min(b, p, e) < 1:
        raise ValueError(f"tokens must have B, P, E >= 1, got {tuple(tokens.shape)}")
    _checks.size("text", text.shape[1], e, "width E (text.shape[1]) = tokens.shape[2]")
    if text.shape[0] < 1:
        raise ValueError("text must hold at least one class row [K>=1, E]")
    _checks.labels("labels", labels, b, text.shape[0])
    _checks.same_device(tokens=tokens, labels=labels)
    return _checks.positive_finite("temperature", temperature)


def token_text_target(tokens, text, labels, *, temperature=1.0):
    """G [B, P] fp32: softmax over patches of cos(tokens[b, n], text[labels[b]]) / temperature."""
    temperature = _check(tokens, text, labels, temperature)
    if not runs_triton(tokens):
        return reference.token_text_target(tokens, text, labels, temperature=temperature)
    return _TokenTextTarget.apply(tokens, text, labels, temperature)
