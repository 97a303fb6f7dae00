r"""Semantic label smoothing over CLIPood's margin metric softmax (SPEC.md section 5).

    f̂_b = f_b / max(‖f_b‖, ε),   x_b = f̂_b − α t_{y_b}
    z[b, c] = s · x_b · t_c                              (s = logit_scale; one GEMM for both terms)
    target[b, c] = ε_y if c = y_b else class_dist[y_b, c]
    loss = (1/B) Σ_b (lse_b Σ_c target − Σ_c target z)

Forward: one launch, a program per block of images streaming the classes with an online
log-sum-exp; it writes the logits (an output) and keeps lse per image. Backward: one launch:

    dz = (g / B) (softmax(z) Σ_c target − target) + d logits
    dx_b = s Σ_c dz t_c,   df_b = (dx_b − [‖f_b‖ ≥ ε] f̂_b (f̂_b·dx_b)) / max(‖f_b‖, ε)
    dt_c += s Σ_b dz x_b − α Σ_{b: y_b = c} dx_b,   d class_dist[y_b, c] += −(g / B) log softmax(z)
                                                                        (c ≠ y_b; atomics)

df needs the full row dot f̂·dx, so dx is written chunk by chunk into df's buffer, then
re-read by the same program after a barrier and projected in place.
"""
import torch

from . import _checks, reference
from ._runtime import HAS_TRITON, cuda_arch, dot_precision, runs_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

EPS = reference.NORM_EPS


def sls_configs(device, dtype):
    if cuda_arch(device) is None:
        return dict(BLOCK_B=16, BLOCK_K=16, BLOCK_E=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:   # tf32x3 operands: half the class tile keeps the backward in registers
        return dict(BLOCK_B=16, BLOCK_K=32, BLOCK_E=64, num_warps=8, num_stages=2)
    return dict(BLOCK_B=16, BLOCK_K=64, BLOCK_E=64, num_warps=4, num_stages=3)


if HAS_TRITON:

    @triton.jit
    def _feature_norms(F_, offs_b, b_mask, E, sfb, sfe, eps, BLOCK_B: tl.constexpr,
                       BLOCK_E: tl.constexpr):
        ff = tl.zeros([BLOCK_B], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            f = tl.load(F_ + offs_b[:, None] * sfb + offs_e[None, :] * sfe,
                        mask=b_mask[:, None] & (offs_e < E)[None, :], other=0.0).to(tl.float32)
            ff += tl.sum(f * f, 1)
        nf = tl.sqrt(ff)
        return nf, 1.0 / tl.maximum(nf, eps)

    @triton.jit
    def _margin_features(F_, Text, offs_b, b_mask, y, offs_e, e_mask, inv_nf, alpha, sfb, sfe,
                         stk, ste):
        """x = f̂ − α t_y for one E chunk, and f̂ itself."""
        mask = b_mask[:, None] & e_mask[None, :]
        f_hat = tl.load(F_ + offs_b[:, None] * sfb + offs_e[None, :] * sfe, mask=mask,
                        other=0.0).to(tl.float32) * inv_nf[:, None]
        t_y = tl.load(Text + y[:, None] * stk + offs_e[None, :] * ste, mask=mask,
                      other=0.0).to(tl.float32)
        return f_hat - alpha * t_y, f_hat

    @triton.jit
    def _margin_logits(F_, Text, offs_b, b_mask, y, offs_k, k_mask, inv_nf, alpha, scale, E,
                       sfb, sfe, stk, ste, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        z = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x, _ = _margin_features(F_, Text, offs_b, b_mask, y, offs_e, e_mask, inv_nf, alpha,
                                    sfb, sfe, stk, ste)
            tt = tl.load(Text + offs_k[None, :] * stk + offs_e[:, None] * ste,
                         mask=e_mask[:, None] & k_mask[None, :], other=0.0)
            z += tl.dot(x.to(tt.dtype), tt, input_precision=PRECISION)
        return z * scale

    @triton.jit
    def _soft_target(CD, offs_b, b_mask, y, offs_k, k_mask, scdk, scdc, epsilon):
        cd = tl.load(CD + y[:, None] * scdk + offs_k[None, :] * scdc,
                     mask=b_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        return tl.where(offs_k[None, :] == y[:, None], epsilon, cd)

    @triton.jit
    def _sls_fwd_kernel(
        F_, Text, Labels, CD, Logits, Lse, Loss, sfb, sfe, stk, ste, scdk, scdc, B, K, E,
        alpha, scale, epsilon, inv_b, eps,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        y = tl.load(Labels + offs_b, mask=b_mask, other=0)
        norms = _feature_norms(F_, offs_b, b_mask, E, sfb, sfe, eps, BLOCK_B, BLOCK_E)
        inv_nf = norms[1]
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_B], tl.float32)
        tz = tl.zeros([BLOCK_B], tl.float32)
        ts = tl.zeros([BLOCK_B], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            z = _margin_logits(F_, Text, offs_b, b_mask, y, offs_k, k_mask, inv_nf, alpha, scale,
                               E, sfb, sfe, stk, ste, BLOCK_B, BLOCK_K, BLOCK_E, PRECISION)
            valid = b_mask[:, None] & k_mask[None, :]
            tl.store(Logits + offs_b[:, None] * K + offs_k[None, :], z, mask=valid)
            target = _soft_target(CD, offs_b, b_mask, y, offs_k, k_mask, scdk, scdc, epsilon)
            target = tl.where(valid, target, 0.0)
            zm = tl.where(k_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, 1))
            l_sum = l_sum * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), 1)
            m = m_new
            tz += tl.sum(target * z, 1)
            ts += tl.sum(target, 1)
        lse = m + tl.log(l_sum)
        tl.store(Lse + offs_b, lse, mask=b_mask)
        tl.atomic_add(Loss, tl.sum(tl.where(b_mask, lse * ts - tz, 0.0), 0) * inv_b)

    @triton.jit
    def _sls_bwd_kernel(
        F_, Text, Labels, CD, Logits, Lse, DLoss, DLogits, DF, GText, DCD,
        sfb, sfe, stk, ste, scdk, scdc, sdlb, sdlk, B, K, E, alpha, scale, epsilon, inv_b, eps,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        PRECISION: tl.constexpr, HAS_DLOGITS: tl.constexpr, TEXT_GRAD: tl.constexpr,
        CD_GRAD: tl.constexpr,
    ):
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < B
        y = tl.load(Labels + offs_b, mask=b_mask, other=0)
        g = tl.load(DLoss).to(tl.float32) * inv_b
        nf, inv_nf = _feature_norms(F_, offs_b, b_mask, E, sfb, sfe, eps, BLOCK_B, BLOCK_E)
        lse = tl.load(Lse + offs_b, mask=b_mask, other=0.0)
        ts = tl.zeros([BLOCK_B], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            target = _soft_target(CD, offs_b, b_mask, y, offs_k, k_mask, scdk, scdc, epsilon)
            ts += tl.sum(tl.where(k_mask[None, :], target, 0.0), 1)
        radial = tl.zeros([BLOCK_B], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x, f_hat = _margin_features(F_, Text, offs_b, b_mask, y, offs_e, e_mask, inv_nf,
                                        alpha, sfb, sfe, stk, ste)
            dx = tl.zeros([BLOCK_B, BLOCK_E], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                valid = b_mask[:, None] & k_mask[None, :]
                z = tl.load(Logits + offs_b[:, None] * K + offs_k[None, :], mask=valid,
                            other=float("-inf"))
                target = _soft_target(CD, offs_b, b_mask, y, offs_k, k_mask, scdk, scdc, epsilon)
                log_p = z - lse[:, None]
                dz = g * (tl.exp(log_p) * ts[:, None] - target)
                if HAS_DLOGITS:
                    dz += tl.load(DLogits + offs_b[:, None] * sdlb + offs_k[None, :] * sdlk,
                                  mask=valid, other=0.0).to(tl.float32)
                dz = tl.where(valid, dz, 0.0)
                tt = tl.load(Text + offs_k[:, None] * stk + offs_e[None, :] * ste,
                             mask=k_mask[:, None] & e_mask[None, :], other=0.0)
                dx += tl.dot(dz.to(tt.dtype), tt, input_precision=PRECISION) * scale
                if TEXT_GRAD:
                    gt = tl.dot(tl.trans(dz).to(tt.dtype), x.to(tt.dtype),
                                input_precision=PRECISION) * scale
                    tl.atomic_add(GText + offs_k[:, None] * E + offs_e[None, :], gt,
                                  mask=k_mask[:, None] & e_mask[None, :])
                if CD_GRAD:
                    if e0 == 0:
                        tl.atomic_add(DCD + y[:, None] * K + offs_k[None, :], -g * tl.where(valid, log_p, 0.0),
                                      mask=valid & (offs_k[None, :] != y[:, None]))
            if TEXT_GRAD:
                tl.atomic_add(GText + y[:, None] * E + offs_e[None, :], -alpha * dx,
                              mask=b_mask[:, None] & e_mask[None, :])
            radial += tl.sum(f_hat * dx, 1)
            tl.store(DF + offs_b[:, None] * E + offs_e[None, :], dx,
                     mask=b_mask[:, None] & e_mask[None, :])
        tl.debug_barrier()
        radial = tl.where(nf >= eps, radial, 0.0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask = b_mask[:, None] & (offs_e < E)[None, :]
            dx = tl.load(DF + offs_b[:, None] * E + offs_e[None, :], mask=mask, other=0.0)
            f_hat = tl.load(F_ + offs_b[:, None] * sfb + offs_e[None, :] * sfe, mask=mask,
                            other=0.0).to(tl.float32) * inv_nf[:, None]
            tl.store(DF + offs_b[:, None] * E + offs_e[None, :],
                     (dx - f_hat * radial[:, None]) * inv_nf[:, None], mask=mask)


class _SLSMMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text, labels, class_dist, alpha, logit_scale, epsilon):
        b, e = image_features.shape
        k = text.shape[0]
        cfg = sls_configs(image_features.device, image_features.dtype)
        logits = torch.empty((b, k), dtype=torch.float32, device=image_features.device)
        lse = torch.empty((b,), dtype=torch.float32, device=image_features.device)
        loss = torch.zeros((), dtype=torch.float32, device=image_features.device)
        _sls_fwd_kernel[(triton.cdiv(b, cfg["BLOCK_B"]),)](
            image_features, text, labels, class_dist, logits, lse, loss,
            *image_features.stride(), *text.stride(), *class_dist.stride(), b, k, e,
            alpha, logit_scale, epsilon, 1.0 / b, EPS,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], BLOCK_E=cfg["BLOCK_E"],
            PRECISION=dot_precision(image_features), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.save_for_backward(image_features, text, labels, class_dist, logits, lse)
        ctx.params = (alpha, logit_scale, epsilon)
        ctx.set_materialize_grads(False)
        return loss, logits

    @staticmethod
    def backward(ctx, dloss, dlogits):
        image_features, text, labels, class_dist, logits, lse = ctx.saved_tensors
        alpha, logit_scale, epsilon = ctx.params
        b, e = image_features.shape
        k = text.shape[0]
        cfg = sls_configs(image_features.device, image_features.dtype)
        dev = image_features.device
        if dloss is None:
            dloss = torch.zeros((), dtype=torch.float32, device=dev)
        text_grad, cd_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        df = torch.empty((b, e), dtype=torch.float32, device=dev)
        g_text = torch.zeros((k, e), dtype=torch.float32, device=dev) if text_grad else df
        dcd = torch.zeros((k, k), dtype=torch.float32, device=dev) if cd_grad else df
        dl_arg = dlogits if dlogits is not None else logits
        _sls_bwd_kernel[(triton.cdiv(b, cfg["BLOCK_B"]),)](
            image_features, text, labels, class_dist, logits, lse, dloss, dl_arg, df, g_text,
            dcd, *image_features.stride(), *text.stride(), *class_dist.stride(),
            *dl_arg.stride(), b, k, e, alpha, logit_scale, epsilon, 1.0 / b, EPS,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], BLOCK_E=cfg["BLOCK_E"],
            PRECISION=dot_precision(image_features), HAS_DLOGITS=dlogits is not None,
            TEXT_GRAD=text_grad, CD_GRAD=cd_grad, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return (df.to(image_features.dtype), g_text.to(text.dtype) if text_grad else None, None,
                dcd.to(class_dist.dtype) if cd_grad else None, None, None, None)


def _check(image_features, text, labels, class_dist, alpha, logit_scale, epsilon):
    _checks.tensor("image_features", image_features, 2, "[B, E]")
    _checks.tensor("text", text, 2, "[K, E]")
    _checks.tensor("class_dist", class_dist, 2, "[K, K]")
    _checks.same_device_dtype(image_features=image_features, text=text)
    b, e = image_features.shape
    k = text.shape[0]
    _checks.labels("labels", labels, b, k)
    _checks.same_device(image_features=image_features, class_dist=class_dist, labels=labels)
    if b < 1 or e < 1 or k < 1:
        raise ValueError(f"image_features [B, E] and text [K, E] must be non-empty, got "
                         f"{tuple(image_features.shape)} and {tuple(text.shape)}")
    _checks.size("text", text.shape[1], e, "width E (text.shape[1]) = image_features.shape[1]")
    if tuple(class_dist.shape) != (k, k):
        raise ValueError(f"class_dist must have shape [K, K]=[{k}, {k}], got {tuple(class_dist.shape)}")
    return (_checks.finite("alpha", alpha), _checks.positive_finite("logit_scale", logit_scale),
            _checks.finite("epsilon", epsilon))


def sls_mms_loss(image_features, text, labels, class_dist, *, alpha=0.3, logit_scale=100.0,
                 epsilon=0.9):
    """`(loss, logits [B, K] fp32)`: SLS soft-target cross-entropy over CLIPood's margin logits."""
    alpha, logit_scale, epsilon = _check(image_features, text, labels, class_dist, alpha,
                                         logit_scale, epsilon)
    if not runs_triton(image_features):
        return reference.sls_mms_loss(image_features, text, labels, class_dist, alpha=alpha,
                                      logit_scale=logit_scale, epsilon=epsilon)
    return _SLSMMS.apply(image_features, text, labels, class_dist, alpha, logit_scale, epsilon)


def class_distribution(text, *, smoothing=35.0):
    """SLS class relations [K, K] fp32: softmax(text textᵀ · smoothing, dim=1). Once per run."""
    _checks.tensor("text", text, 2, "[K, E]")
    if text.shape[0] < 1 or text.shape[1] < 1:
        raise ValueError(f"text must have shape [K, E] with K, E >= 1, got {tuple(text.shape)}")
    smoothing = _checks.positive_finite("smoothing", smoothing)
    return reference.class_distribution(text, smoothing=smoothing)
