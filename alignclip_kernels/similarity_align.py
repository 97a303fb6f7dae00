r"""Similarity alignment: KL(Q ‖ Pr) between both paths' patch-to-class maps (SPEC.md section 4).

    S[b, n, c] = û_n · t̂_c,  S_dv likewise from the D-V tokens,   (û = u / max(‖u‖, ε))
    Pr = softmax_n S,  Q = softmax_n S_dv,   loss = (1/B) Σ_{b,c} KL_c,  KL_c = Σ_n Q (log Q − log Pr)

|S| ≤ 1, so the softmax needs no running maximum: with l_p = Σ_n e^{S−1}, l_q = Σ_n e^{S_dv−1},
w = Σ_n e^{S_dv−1} (S_dv − S), each column's KL_c = w / l_q − log(l_q / l_p) in one pass.
Nothing of size [B, P, K] is stored: the forward keeps (l_p, l_q, KL) per (b, c) and the backward
recomputes S tile by tile. With g = d loss / B:

    dS_dv = g Q (S_dv − S − log(l_q/l_p) − KL_c),     dS = g (Pr − Q)
    dû_n = Σ_c dS t̂_c,   du_n = (dû_n − [‖u_n‖ ≥ ε] û_n Σ_c dS S) / max(‖u_n‖, ε)
    dt̂_c = Σ_{b,n} dS û_n + dS_dv û_dv_n,  dt_c = (dt̂_c − [‖t_c‖ ≥ ε] t̂_c (t̂_c·dt̂_c)) / max(‖t_c‖, ε)

Forward: one launch over (B, class blocks). Backward: one launch over (B, patch blocks) for the
tokens of both paths, plus, only when text needs a gradient, a second that projects the
atomically accumulated dt̂ onto the tangent space of each text row.
"""
import torch

from . import _checks, reference
from ._runtime import HAS_TRITON, cuda_arch, dot_precision, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

EPS = reference.NORM_EPS


def similarity_configs(device, dtype, backward=False):
    if cuda_arch(device) is None:
        return dict(BLOCK_P=32, BLOCK_K=16, BLOCK_E=32, num_warps=4, num_stages=1)
    # The backward holds two [BLOCK_P, BLOCK_E] accumulators beside the recomputed tiles of both
    # paths: 16-row tiles keep it at about 125-155 registers and 12-16 resident warps per SM for
    # every dtype; fp32 (tf32x3) operands are twice as wide, so its forward tiles are smaller
    # (ptxas, sm_90a and sm_80; see `inspect`).
    wide = dtype == torch.float32
    if backward:
        return dict(BLOCK_P=16, BLOCK_K=32, BLOCK_E=32, num_warps=4, num_stages=2)
    return dict(BLOCK_P=32 if wide else 64, BLOCK_K=32, BLOCK_E=32 if wide else 64, num_warps=4,
                num_stages=2 if wide else 3)


if HAS_TRITON:

    @triton.jit
    def _text_inv_norms(Text, offs_k, k_mask, E, sxk, sxe, eps, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr):
        tt = tl.zeros([BLOCK_K], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            t = tl.load(Text + offs_k[:, None] * sxk + offs_e[None, :] * sxe,
                        mask=k_mask[:, None] & (offs_e < E)[None, :], other=0.0).to(tl.float32)
            tt += tl.sum(t * t, 1)
        nt = tl.sqrt(tt)
        return 1.0 / tl.maximum(nt, eps), nt

    @triton.jit
    def _cosine_tiles(Tok, TokDv, Text, offs_p, p_mask, offs_k, k_mask, E, stp, ste, svp, sve,
                      sxk, sxe, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        """Raw dot tiles [BLOCK_P, BLOCK_K] of both paths with the text block, and row sums of squares."""
        s = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        s_dv = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        uu = tl.zeros([BLOCK_P], tl.float32)
        uu_dv = tl.zeros([BLOCK_P], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            u_mask = p_mask[:, None] & e_mask[None, :]
            u = tl.load(Tok + offs_p[:, None] * stp + offs_e[None, :] * ste, mask=u_mask, other=0.0)
            u_dv = tl.load(TokDv + offs_p[:, None] * svp + offs_e[None, :] * sve, mask=u_mask,
                           other=0.0)
            tt = tl.load(Text + offs_e[:, None] * sxe + offs_k[None, :] * sxk,
                         mask=e_mask[:, None] & k_mask[None, :], other=0.0)
            s += tl.dot(u, tt, input_precision=PRECISION)
            s_dv += tl.dot(u_dv, tt, input_precision=PRECISION)
            u = u.to(tl.float32)
            u_dv = u_dv.to(tl.float32)
            uu += tl.sum(u * u, 1)
            uu_dv += tl.sum(u_dv * u_dv, 1)
        return s, s_dv, uu, uu_dv

    @triton.jit
    def _sim_fwd_kernel(
        Tok, TokDv, Text, Stats, Loss, stb, stp, ste, svb, svp, sve, sxk, sxe, P, K, E, inv_b, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        inv_nt, _ = _text_inv_norms(Text, offs_k, k_mask, E, sxk, sxe, eps, BLOCK_K, BLOCK_E)
        l_p = tl.zeros([BLOCK_K], tl.float32)
        l_q = tl.zeros([BLOCK_K], tl.float32)
        w = tl.zeros([BLOCK_K], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            s, s_dv, uu, uu_dv = _cosine_tiles(
                Tok + b * stb, TokDv + b * svb, Text, offs_p, p_mask, offs_k, k_mask, E, stp,
                ste, svp, sve, sxk, sxe, BLOCK_P, BLOCK_K, BLOCK_E, PRECISION)
            s = s / tl.maximum(tl.sqrt(uu), eps)[:, None] * inv_nt[None, :]
            s_dv = s_dv / tl.maximum(tl.sqrt(uu_dv), eps)[:, None] * inv_nt[None, :]
            row = p_mask[:, None]
            e_p = tl.where(row, tl.exp(s - 1.0), 0.0)
            e_q = tl.where(row, tl.exp(s_dv - 1.0), 0.0)
            l_p += tl.sum(e_p, 0)
            l_q += tl.sum(e_q, 0)
            w += tl.sum(e_q * (s_dv - s), 0)
        log_ratio = tl.log(l_q / l_p)
        kl = tl.where(k_mask, w / l_q - log_ratio, 0.0)
        stats = Stats + b * 3 * K
        tl.store(stats + offs_k, l_p, mask=k_mask)
        tl.store(stats + K + offs_k, l_q, mask=k_mask)
        tl.store(stats + 2 * K + offs_k, kl, mask=k_mask)
        tl.atomic_add(Loss, tl.sum(kl, 0) * inv_b)

    @triton.jit
    def _sim_grad_tiles(Tok, TokDv, Text, Stats, offs_p, p_mask, k0, K, E, stp, ste, svp, sve,
                        sxk, sxe, inv_nu, inv_nu_dv, g, eps,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                        PRECISION: tl.constexpr):
        """Cosine tiles S, S_dv and their gradients dS, dS_dv for one class block."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        inv_nt, _ = _text_inv_norms(Text, offs_k, k_mask, E, sxk, sxe, eps, BLOCK_K, BLOCK_E)
        s, s_dv, _, _ = _cosine_tiles(Tok, TokDv, Text, offs_p, p_mask, offs_k, k_mask, E, stp,
                                      ste, svp, sve, sxk, sxe, BLOCK_P, BLOCK_K, BLOCK_E, PRECISION)
        s = s * inv_nu[:, None] * inv_nt[None, :]
        s_dv = s_dv * inv_nu_dv[:, None] * inv_nt[None, :]
        l_p = tl.load(Stats + offs_k, mask=k_mask, other=1.0)
        l_q = tl.load(Stats + K + offs_k, mask=k_mask, other=1.0)
        kl = tl.load(Stats + 2 * K + offs_k, mask=k_mask, other=0.0)
        valid = p_mask[:, None] & k_mask[None, :]
        pr = tl.exp(s - 1.0) / l_p[None, :]
        q = tl.exp(s_dv - 1.0) / l_q[None, :]
        log_ratio = s_dv - s - tl.log(l_q / l_p)[None, :]
        ds = tl.where(valid, g * (pr - q), 0.0)
        ds_dv = tl.where(valid, g * q * (log_ratio - kl[None, :]), 0.0)
        return s, s_dv, ds, ds_dv, offs_k, k_mask, inv_nt

    @triton.jit
    def _sim_bwd_kernel(
        Tok, TokDv, Text, Stats, DLoss, DTok, DTokDv, GText,
        stb, stp, ste, svb, svp, sve, sxk, sxe, sdb, sdp, P, K, E, inv_b, eps,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        PRECISION: tl.constexpr, TEXT_GRAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        g = tl.load(DLoss).to(tl.float32) * inv_b
        Tok += b * stb
        TokDv += b * svb
        Stats += b * 3 * K
        uu = tl.zeros([BLOCK_P], tl.float32)
        uu_dv = tl.zeros([BLOCK_P], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask = p_mask[:, None] & (offs_e < E)[None, :]
            u = tl.load(Tok + offs_p[:, None] * stp + offs_e[None, :] * ste, mask=mask,
                        other=0.0).to(tl.float32)
            u_dv = tl.load(TokDv + offs_p[:, None] * svp + offs_e[None, :] * sve, mask=mask,
                           other=0.0).to(tl.float32)
            uu += tl.sum(u * u, 1)
            uu_dv += tl.sum(u_dv * u_dv, 1)
        nu = tl.sqrt(uu)
        nu_dv = tl.sqrt(uu_dv)
        inv_nu = 1.0 / tl.maximum(nu, eps)
        inv_nu_dv = 1.0 / tl.maximum(nu_dv, eps)
        # r_n = û_n · dû_n = Σ_c dS S: the radial part removed by the normalisation's backward.
        r = tl.zeros([BLOCK_P], tl.float32)
        r_dv = tl.zeros([BLOCK_P], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            s, s_dv, ds, ds_dv, _, _, _ = _sim_grad_tiles(
                Tok, TokDv, Text, Stats, offs_p, p_mask, k0, K, E, stp, ste, svp, sve, sxk, sxe,
                inv_nu, inv_nu_dv, g, eps, BLOCK_P, BLOCK_K, BLOCK_E, PRECISION)
            r += tl.sum(ds * s, 1)
            r_dv += tl.sum(ds_dv * s_dv, 1)
        r = tl.where(nu >= eps, r, 0.0)
        r_dv = tl.where(nu_dv >= eps, r_dv, 0.0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            mask = p_mask[:, None] & e_mask[None, :]
            u_hat = tl.load(Tok + offs_p[:, None] * stp + offs_e[None, :] * ste, mask=mask,
                            other=0.0).to(tl.float32) * inv_nu[:, None]
            u_dv_hat = tl.load(TokDv + offs_p[:, None] * svp + offs_e[None, :] * sve, mask=mask,
                               other=0.0).to(tl.float32) * inv_nu_dv[:, None]
            acc = tl.zeros([BLOCK_P, BLOCK_E], tl.float32)
            acc_dv = tl.zeros([BLOCK_P, BLOCK_E], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                _, _, ds, ds_dv, offs_k, k_mask, inv_nt = _sim_grad_tiles(
                    Tok, TokDv, Text, Stats, offs_p, p_mask, k0, K, E, stp, ste, svp, sve, sxk,
                    sxe, inv_nu, inv_nu_dv, g, eps, BLOCK_P, BLOCK_K, BLOCK_E, PRECISION)
                t_hat = tl.load(Text + offs_k[:, None] * sxk + offs_e[None, :] * sxe,
                                mask=k_mask[:, None] & e_mask[None, :],
                                other=0.0).to(tl.float32) * inv_nt[:, None]
                io = Tok.dtype.element_ty
                t_hat = t_hat.to(io)
                acc += tl.dot(ds.to(io), t_hat, input_precision=PRECISION)
                acc_dv += tl.dot(ds_dv.to(io), t_hat, input_precision=PRECISION)
                if TEXT_GRAD:
                    gt = tl.dot(tl.trans(ds).to(io), u_hat.to(io), input_precision=PRECISION) \
                        + tl.dot(tl.trans(ds_dv).to(io), u_dv_hat.to(io), input_precision=PRECISION)
                    tl.atomic_add(GText + offs_k[:, None] * E + offs_e[None, :], gt,
                                  mask=k_mask[:, None] & e_mask[None, :])
            du = (acc - u_hat * r[:, None]) * inv_nu[:, None]
            du_dv = (acc_dv - u_dv_hat * r_dv[:, None]) * inv_nu_dv[:, None]
            out_off = b * sdb + offs_p[:, None] * sdp + offs_e[None, :]
            tl.store(DTok + out_off, du.to(DTok.dtype.element_ty), mask=mask)
            tl.store(DTokDv + out_off, du_dv.to(DTokDv.dtype.element_ty), mask=mask)

    @triton.jit
    def _normalize_bwd_rows_kernel(X, GHat, DX, sxr, sxe, E, eps, BLOCK_E: tl.constexpr):
        """dx = (ĝ − [‖x‖ ≥ ε] x̂ (x̂·ĝ)) / max(‖x‖, ε) for one row: the backward of F.normalize."""
        row = tl.program_id(0)
        xx = tl.zeros([BLOCK_E], tl.float32)
        xg = tl.zeros([BLOCK_E], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x = tl.load(X + row * sxr + offs_e * sxe, mask=e_mask, other=0.0).to(tl.float32)
            gh = tl.load(GHat + row * E + offs_e, mask=e_mask, other=0.0)
            xx += x * x
            xg += x * gh
        nx = tl.sqrt(tl.sum(xx, 0))
        den = tl.maximum(nx, eps)
        radial = tl.where(nx >= eps, tl.sum(xg, 0) / den, 0.0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x = tl.load(X + row * sxr + offs_e * sxe, mask=e_mask, other=0.0).to(tl.float32)
            gh = tl.load(GHat + row * E + offs_e, mask=e_mask, other=0.0)
            tl.store(DX + row * E + offs_e, ((gh - x / den * radial) / den).to(DX.dtype.element_ty),
                     mask=e_mask)


class _SimilarityAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, tokens_dv, text):
        b, p, e = tokens.shape
        k = text.shape[0]
        cfg = similarity_configs(tokens.device, tokens.dtype)
        stats = torch.empty((b, 3, k), dtype=torch.float32, device=tokens.device)
        loss = torch.zeros((), dtype=torch.float32, device=tokens.device)
        _sim_fwd_kernel[(b, triton.cdiv(k, cfg["BLOCK_K"]))](
            tokens, tokens_dv, text, stats, loss, *tokens.stride(), *tokens_dv.stride(),
            *text.stride(), p, k, e,
            1.0 / b, EPS, BLOCK_P=cfg["BLOCK_P"], BLOCK_K=cfg["BLOCK_K"], BLOCK_E=cfg["BLOCK_E"],
            PRECISION=dot_precision(tokens), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.save_for_backward(tokens, tokens_dv, text, stats)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        tokens, tokens_dv, text, stats = ctx.saved_tensors
        b, p, e = tokens.shape
        k = text.shape[0]
        cfg = similarity_configs(tokens.device, tokens.dtype, backward=True)
        text_grad = ctx.needs_input_grad[2]
        dtok = torch.empty((b, p, e), dtype=tokens.dtype, device=tokens.device)
        dtok_dv = torch.empty_like(dtok)
        g_text = (torch.zeros((k, e), dtype=torch.float32, device=text.device) if text_grad
                  else stats)
        _sim_bwd_kernel[(b, triton.cdiv(p, cfg["BLOCK_P"]))](
            tokens, tokens_dv, text, stats, dloss, dtok, dtok_dv, g_text, *tokens.stride(),
            *tokens_dv.stride(), *text.stride(), dtok.stride(0), dtok.stride(1), p, k, e, 1.0 / b, EPS,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_K=cfg["BLOCK_K"], BLOCK_E=cfg["BLOCK_E"],
            PRECISION=dot_precision(tokens), TEXT_GRAD=text_grad, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dtext = None
        if text_grad:
            dtext = torch.empty((k, e), dtype=text.dtype, device=text.device)
            _normalize_bwd_rows_kernel[(k,)](text, g_text, dtext, *text.stride(), e, EPS,
                                             BLOCK_E=min(1024, max(16, triton.next_power_of_2(e))))
        return dtok, dtok_dv, dtext


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


def similarity_align_loss(tokens, tokens_dv, text):
    """KL(Q ‖ Pr) batchmean of the patch softmaxes of both paths' patch-to-class cosines."""
    _check(tokens, tokens_dv, text)
    if not runs_triton(tokens):
        return reference.similarity_align_loss(tokens, tokens_dv, text)
    return _SimilarityAlign.apply(tokens, tokens_dv, text)
