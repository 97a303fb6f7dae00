r"""Semantic label smoothing over CLIPood's margin metric softmax.

For image features f [B, E] (normalised here), class text t [K, E], labels y [B] and class
relations class_dist [K, K] = softmax(t tᵀ · smoothing) (`class_distribution`):

    f̂_b = f_b / max(‖f_b‖, ε),   x_b = f̂_b − α t_{y_b}
    z[b, c] = s · x_b · t_c                            logits, s = logit_scale (one GEMV per image)
    target[b, c] = ε_y if c = y_b, else class_dist[y_b, c]      (not renormalised, as the authors)
    loss = (1/B) Σ_b (lse_b Σ_c target[b, c] − Σ_c target[b, c] z[b, c])

Forward, one launch over (image, split): the programs of an image share its classes in
BLOCK_K blocks (each reads the image's feature row once, as one vector), write the logits and
publish partial (max, Σexp, Σ target·z, Σ target); the last of them finishes the image's
logsumexp and loss. Backward, one launch over (image, split), no cross-program step:

    dz = (g / B) (softmax(z) Σ_c target − target) + d logits
    dx_b = s Σ_c dz t_c,   df_b = (dx_b − [‖f_b‖ ≥ ε] f̂_b (f̂_b · dx_b)) / max(‖f_b‖, ε)
    dt_c += s Σ_b dz x_b − α Σ_{b: y_b = c} dx_b,   d class_dist[y_b, c] += −(g / B) log softmax(z)_c

df is linear in dx, so each program adds the df of its classes (atomically when an image has
several programs). The products are matrix-vector products on CUDA cores (one image a
program): tensor cores would pad the batch side of every tile to 16.

Necessary multiply-adds (`roofline.sls_mms`): B·K·E forward, B·K·E backward, B·K·E more for
d(text). A label outside [0, K) gives NaN logits and loss for its image.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _checks, reference
from ._runtime import HAS_TRITON, cuda_arch, deterministic_flag, loss_pytorch_path, next_pow2, on_device, runs_triton
from .kernel_utils import (
    LaunchConfig,
    fills_gpu,
    loss_buffer,
    loss_total,
    placeholder,
    refuse_double_backward,
    rows_by_label,
    split_blocks,
)
from .paper import LABEL_EPSILON, LOGIT_SCALE, MARGIN_ALPHA, SMOOTHING

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernel_utils import (
        accumulate,
        add_loss,
        combine_logsumexp,
        gemv,
        gemv_t,
        inv_norm,
        last_to_arrive,
        outer_fma,
        split_block,
    )
    from .token_text_target import label_row

EPS = reference.NORM_EPS
PARTIAL_WIDTH = 4   # (max, Σexp, Σ target·z, Σ target) per program


def sls_config(b, k, e, device):
    """BLOCK_K classes × the whole (padded) width per tile: the least class padding, then the
    largest block; halved while the images alone would leave multiprocessors idle and the
    padding does not grow (K = 7 runs as two blocks of 4, two programs an image).

    A [BLOCK_K, E] fp32 tile is held for the product: at most 64 registers a thread.
    """
    e_pad = next_pow2(e)
    interpreted = cuda_arch(device) is None
    choices = (4, 8, 16, 32)
    padded = lambda bk: -(-k // bk) * bk  # noqa: E731
    block_k = min(reversed(choices), key=padded)
    while block_k > choices[0] and not fills_gpu(b * -(-k // block_k), device) \
            and padded(block_k // 2) == padded(block_k):
        block_k //= 2
    if interpreted:
        return LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_K=block_k, E_PAD=e_pad)
    while block_k > 1 and block_k * e_pad > 16384:
        block_k //= 2
    warps = 8 if block_k * e_pad > 8192 else 4
    return LaunchConfig.of(num_warps=warps, num_stages=2, BLOCK_K=block_k, E_PAD=e_pad)


if HAS_TRITON:

    @triton.jit
    def margin_features(F_, Text, b, y, offs_e, e_mask, stride_fb, stride_fe, stride_tk, stride_te,
                        alpha, eps):
        """(x = f̂ − α t_y, f̂, ‖f‖, 1/max(‖f‖, ε)) of image b, its feature row read once."""
        f = tl.load(F_ + b * stride_fb + offs_e * stride_fe, mask=e_mask, other=0.0).to(tl.float32)
        ff = tl.sum(f * f, axis=0)
        inv_nf = inv_norm(ff, eps)
        f_hat = f * inv_nf
        t_y = tl.load(Text + y * stride_tk + offs_e * stride_te, mask=e_mask, other=0.0).to(tl.float32)
        return f_hat - alpha * t_y, f_hat, tl.sqrt(ff), inv_nf

    @triton.jit
    def soft_target(CD, y, offs_k, k_mask, stride_ck, stride_cc, epsilon):
        cd = tl.load(CD + y * stride_ck + offs_k * stride_cc, mask=k_mask, other=0.0).to(tl.float32)
        return tl.where(k_mask, tl.where(offs_k == y, epsilon, cd), 0.0)

    @triton.jit
    def _sls_fwd_kernel(
        F_, Text, Labels, CD, Logits, Lse, TargetSum, Loss, Partial, Tickets,
        stride_fb, stride_fe,
        stride_tk, stride_te,
        stride_ck, stride_cc,
        K, E, n_blocks, blocks_per_program, alpha, scale, epsilon, inv_b, eps,
        BLOCK_K: tl.constexpr, E_PAD: tl.constexpr, SPLIT: tl.constexpr, EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        y, label_ok = label_row(Labels, b, K)
        offs_e = tl.arange(0, E_PAD)
        e_mask = offs_e < E
        x, _, _, _ = margin_features(F_, Text, b, y, offs_e, e_mask, stride_fb, stride_fe, stride_tk,
                                     stride_te, alpha, eps)
        m_z = float("-inf")
        l_z = 0.0
        tz = 0.0
        ts = 0.0
        for i in range(0, blocks_per_program):
            valid, offs_k, k_mask = split_block(split, i, blocks_per_program, n_blocks, K, BLOCK_K)
            if valid:
                t = tl.load(Text + offs_k[:, None] * stride_tk + offs_e[None, :] * stride_te,
                            mask=k_mask[:, None] & e_mask[None, :], other=0.0)
                z = gemv(t, x) * scale
                z = tl.where(label_ok, z, float("nan"))
                tl.store(Logits + b * K + offs_k, z, mask=k_mask)
                target = soft_target(CD, y, offs_k, k_mask, stride_ck, stride_cc, epsilon)
                zm = tl.where(k_mask, z, float("-inf"))
                m_new = tl.maximum(m_z, tl.max(zm, axis=0))
                l_z = l_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(zm - m_new), axis=0)
                m_z = m_new
                tz += tl.sum(tl.where(k_mask, target * z, 0.0), axis=0)
                ts += tl.sum(target, axis=0)
        if SPLIT:
            part = Partial + (b * n_splits + split) * 4
            tl.store(part, m_z)
            tl.store(part + 1, l_z)
            tl.store(part + 2, tz)
            tl.store(part + 3, ts)
            if last_to_arrive(Tickets, b, n_splits):
                parts = Partial + b * n_splits * 4
                m_z, l_z = combine_logsumexp(parts, n_splits, 4)
                offs_s = tl.arange(0, 16)
                s_mask = offs_s < n_splits
                tz = tl.sum(tl.load(parts + offs_s * 4 + 2, mask=s_mask, other=0.0,
                                    cache_modifier=".cg"), axis=0)
                ts = tl.sum(tl.load(parts + offs_s * 4 + 3, mask=s_mask, other=0.0,
                                    cache_modifier=".cg"), axis=0)
                lse = m_z + tl.log(l_z)
                tl.store(Lse + b, lse)
                tl.store(TargetSum + b, ts)
                add_loss(Loss, b, (lse * ts - tz) * inv_b, EXACT_ORDER)
        else:
            lse = m_z + tl.log(l_z)
            tl.store(Lse + b, lse)
            tl.store(TargetSum + b, ts)
            add_loss(Loss, b, (lse * ts - tz) * inv_b, EXACT_ORDER)

    @triton.jit
    def _sls_bwd_kernel(
        F_, Text, Labels, CD, Logits, Lse, TargetSum, DLoss, DLogits, DF, DText, DXRows, DCD,
        stride_fb, stride_fe,
        stride_tk, stride_te,
        stride_ck, stride_cc,
        stride_dlb, stride_dlk,
        K, E, n_blocks, blocks_per_program, alpha, scale, epsilon, inv_b, eps,
        BLOCK_K: tl.constexpr, E_PAD: tl.constexpr, SPLIT: tl.constexpr,
        HAS_DLOGITS: tl.constexpr, TEXT_GRAD: tl.constexpr, CD_GRAD: tl.constexpr,
        EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        y, _ = label_row(Labels, b, K)
        # Atomics add into the class rows; EXACT_ORDER writes an image's rows of its own
        # (DText [B, K, E], DCD [B, K]) and each program's α dx and df (DXRows, DF [B, splits,
        # E]), which the host combines in a fixed order.
        slot = b * tl.num_programs(1) + split
        if EXACT_ORDER:
            DText_own = DText + b * K * E
            DCD_row = DCD + b * K
            DX_row = DXRows + slot * E
            DF_row = DF + slot * E
        else:
            DText_own = DText
            DCD_row = DCD + y * K
            DX_row = DText + y * E
            DF_row = DF + b * E
        offs_e = tl.arange(0, E_PAD)
        e_mask = offs_e < E
        x, f_hat, nf, inv_nf = margin_features(F_, Text, b, y, offs_e, e_mask, stride_fb, stride_fe,
                                               stride_tk, stride_te, alpha, eps)
        g = tl.load(DLoss).to(tl.float32) * inv_b
        lse = tl.load(Lse + b)
        ts = tl.load(TargetSum + b)
        dx = tl.zeros([E_PAD], tl.float32)
        for i in range(0, blocks_per_program):
            valid, offs_k, k_mask = split_block(split, i, blocks_per_program, n_blocks, K, BLOCK_K)
            if valid:
                log_p = tl.load(Logits + b * K + offs_k, mask=k_mask, other=float("-inf")) - lse
                target = soft_target(CD, y, offs_k, k_mask, stride_ck, stride_cc, epsilon)
                dz = g * (tl.exp(log_p) * ts - target)
                if HAS_DLOGITS:
                    dz += tl.load(DLogits + b * stride_dlb + offs_k * stride_dlk, mask=k_mask,
                                  other=0.0).to(tl.float32)
                dz = tl.where(k_mask, dz, 0.0)
                t_mask = k_mask[:, None] & e_mask[None, :]
                t = tl.load(Text + offs_k[:, None] * stride_tk + offs_e[None, :] * stride_te,
                            mask=t_mask, other=0.0)
                dx += gemv_t(t, dz) * scale
                if TEXT_GRAD:
                    dt = outer_fma(tl.zeros([BLOCK_K, E_PAD], tl.float32), dz * scale, x)
                    accumulate(DText_own + offs_k[:, None] * E + offs_e[None, :], dt, t_mask, EXACT_ORDER)
                if CD_GRAD:
                    accumulate(DCD_row + offs_k, -g * log_p, k_mask & (offs_k != y), EXACT_ORDER)
        radial = tl.where(nf >= eps, tl.sum(f_hat * dx, axis=0), 0.0)
        df = (dx - f_hat * radial) * inv_nf
        if TEXT_GRAD:
            accumulate(DX_row + offs_e, -alpha * dx, e_mask, EXACT_ORDER)
        if SPLIT:
            accumulate(DF_row + offs_e, df, e_mask, EXACT_ORDER)
        else:
            tl.store(DF + b * E + offs_e, df.to(DF.dtype.element_ty), mask=e_mask)


def _sls_launch(image_features, text, labels, class_dist, alpha, logit_scale, epsilon, config,
                exact_order):
    """The grid and the arguments both kernels take."""
    b, e = image_features.shape
    k = text.shape[0]
    config = config or sls_config(b, k, e, image_features.device)
    n_blocks = triton.cdiv(k, config["BLOCK_K"])
    splits, per_program = split_blocks(b, n_blocks, image_features.device)
    args = dict(
        F_=image_features, Text=text, Labels=labels, CD=class_dist,
        stride_fb=image_features.stride(0), stride_fe=image_features.stride(1),
        stride_tk=text.stride(0), stride_te=text.stride(1),
        stride_ck=class_dist.stride(0), stride_cc=class_dist.stride(1),
        K=k, E=e, n_blocks=n_blocks, blocks_per_program=per_program, alpha=alpha,
        scale=logit_scale, epsilon=epsilon, inv_b=1.0 / b, eps=EPS, SPLIT=splits > 1,
        EXACT_ORDER=exact_order, **config.kwargs,
    )
    return (b, splits), args


def _sls_fwd(image_features, text, labels, class_dist, alpha, logit_scale, epsilon, exact_order=False,
             config=None):
    """(loss, logits [B, K] fp32, lse [B], Σ target [B]) — the last two kept for the backward."""
    grid, args = _sls_launch(image_features, text, labels, class_dist, alpha, logit_scale, epsilon,
                             config, exact_order)
    b, k = image_features.shape[0], text.shape[0]
    f32 = dict(dtype=torch.float32, device=image_features.device)
    logits = torch.empty((b, k), **f32)
    lse = torch.empty((b,), **f32)
    target_sum = torch.empty((b,), **f32)
    loss = loss_buffer(b, image_features.device, exact_order)
    partial = torch.empty((b, grid[1], PARTIAL_WIDTH), **f32)
    tickets = torch.zeros((b,), dtype=torch.int32, device=image_features.device)
    with on_device(image_features):
        _sls_fwd_kernel[grid](Logits=logits, Lse=lse, TargetSum=target_sum, Loss=loss, Partial=partial,
                              Tickets=tickets, **args)
    return loss_total(loss, exact_order), logits, lse, target_sum


def _sls_bwd(dloss, dlogits, image_features, text, labels, class_dist, logits, lse, target_sum,
             alpha, logit_scale, epsilon, text_grad, cd_grad, exact_order=False, config=None):
    """(d image_features, d text fp32 or None, d class_dist fp32 or None)."""
    grid, args = _sls_launch(image_features, text, labels, class_dist, alpha, logit_scale, epsilon,
                             config, exact_order)
    (b, e), k = image_features.shape, text.shape[0]
    splits = grid[1]
    dev = image_features.device
    f32 = dict(dtype=torch.float32, device=dev)
    # Split images accumulate d features from several programs: fp32 atomics into zeros, or
    # one row per program in the deterministic mode.
    if args["SPLIT"]:
        df = torch.zeros((b, splits, e) if exact_order else (b, e), **f32)
    else:
        df = torch.empty(image_features.shape, dtype=image_features.dtype, device=dev)
    unused = placeholder(dev)
    if exact_order:
        dtext = torch.zeros((b, k, e), **f32) if text_grad else unused
        dx_rows = torch.zeros((b, splits, e), **f32) if text_grad else unused
        dcd = torch.zeros((b, k), **f32) if cd_grad else unused
    else:
        dtext = torch.zeros((k, e), **f32) if text_grad else unused
        dx_rows = unused
        dcd = torch.zeros((k, k), **f32) if cd_grad else unused
    with on_device(image_features):
        _sls_bwd_kernel[grid](
            Logits=logits, Lse=lse, TargetSum=target_sum, DLoss=dloss,
            DLogits=dlogits if dlogits is not None else unused, DF=df, DText=dtext, DXRows=dx_rows,
            DCD=dcd,
            stride_dlb=dlogits.stride(0) if dlogits is not None else 0,
            stride_dlk=dlogits.stride(1) if dlogits is not None else 0,
            HAS_DLOGITS=dlogits is not None, TEXT_GRAD=text_grad, CD_GRAD=cd_grad, **args,
        )
        if exact_order:
            df = df.sum(1) if args["SPLIT"] else df
            if text_grad:
                dtext = dtext.sum(0) + rows_by_label(dx_rows.sum(1), labels, k)
            if cd_grad:
                dcd = rows_by_label(dcd, labels, k)
    return df.to(image_features.dtype), (dtext if text_grad else None), (dcd if cd_grad else None)


@torch.library.custom_op("alignclip::sls_mms_loss", mutates_args=())
def _sls_op(image_features: Tensor, text: Tensor, labels: Tensor, class_dist: Tensor, alpha: float,
            logit_scale: float, epsilon: float, exact_order: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _sls_fwd(image_features, text, labels, class_dist, alpha, logit_scale, epsilon, exact_order)


@_sls_op.register_fake
def _(image_features, text, labels, class_dist, alpha, logit_scale, epsilon, exact_order):
    b, k = image_features.shape[0], text.shape[0]
    f32 = dict(dtype=torch.float32)
    return (image_features.new_empty((), **f32), image_features.new_empty((b, k), **f32),
            image_features.new_empty((b,), **f32), image_features.new_empty((b,), **f32))


@torch.library.custom_op("alignclip::sls_mms_loss_backward", mutates_args=())
def _sls_bwd_op(dloss: Tensor, dlogits: Optional[Tensor], image_features: Tensor,
                text: Tensor, labels: Tensor, class_dist: Tensor, logits: Tensor, lse: Tensor,
                target_sum: Tensor, alpha: float, logit_scale: float, epsilon: float,
                text_grad: bool, cd_grad: bool, exact_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    df, dtext, dcd = _sls_bwd(dloss, dlogits, image_features, text, labels,
                              class_dist, logits, lse, target_sum, alpha, logit_scale, epsilon,
                              text_grad, cd_grad, exact_order)
    return (df, dtext.to(text.dtype) if text_grad else text.new_empty(0),
            dcd.to(class_dist.dtype) if cd_grad else class_dist.new_empty(0))


@_sls_bwd_op.register_fake
def _(dloss, dlogits, image_features, text, labels, class_dist, logits, lse,
      target_sum, alpha, logit_scale, epsilon, text_grad, cd_grad, exact_order):
    return (torch.empty_like(image_features), text.new_empty(text.shape if text_grad else (0,)),
            class_dist.new_empty(class_dist.shape if cd_grad else (0,)))


def _setup_context(ctx, inputs, output):
    image_features, text, labels, class_dist, alpha, logit_scale, epsilon, exact_order = inputs
    _, logits, lse, target_sum = output
    ctx.save_for_backward(image_features, text, labels, class_dist, logits, lse, target_sum)
    ctx.params = (alpha, logit_scale, epsilon)
    ctx.exact_order = exact_order
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, dlogits, _d_lse, _d_target_sum):
    refuse_double_backward("sls_mms_loss")
    image_features, text, labels, class_dist, logits, lse, target_sum = ctx.saved_tensors
    text_grad, cd_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if dloss is None:
        dloss = torch.zeros((), dtype=torch.float32, device=logits.device)
    df, dtext, dcd = _sls_bwd_op(dloss, dlogits, image_features, text, labels, class_dist, logits,
                                 lse, target_sum, *ctx.params, text_grad, cd_grad, ctx.exact_order)
    return (df, dtext if text_grad else None, None, dcd if cd_grad else None, None, None, None, None)


_sls_op.register_autograd(_backward, setup_context=_setup_context)


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


def sls_mms_loss(image_features, text, labels, class_dist, *, alpha=MARGIN_ALPHA,
                 logit_scale=LOGIT_SCALE, epsilon=LABEL_EPSILON, deterministic=None):
    """`(loss, logits [B, K] fp32)`: SLS soft-target cross-entropy over CLIPood's margin logits.

    `deterministic` (default: `torch.use_deterministic_algorithms`' setting): no float atomics."""
    alpha, logit_scale, epsilon = _check(image_features, text, labels, class_dist, alpha,
                                         logit_scale, epsilon)
    exact_order = deterministic_flag(deterministic)
    if not runs_triton(image_features):
        return loss_pytorch_path(reference.sls_mms_loss, image_features, text, labels, class_dist,
                                 alpha=alpha, logit_scale=logit_scale, epsilon=epsilon)
    loss, logits, _, _ = _sls_op(image_features, text, labels, class_dist, alpha, logit_scale, epsilon,
                                 exact_order)
    return loss, logits


def class_distribution(text, *, smoothing=SMOOTHING):
    """SLS class relations [K, K] fp32: softmax(text textᵀ · smoothing, dim=1). Once per run."""
    _checks.tensor("text", text, 2, "[K, E]")
    if text.shape[0] < 1 or text.shape[1] < 1:
        raise ValueError(f"text must have shape [K, E] with K, E >= 1, got {tuple(text.shape)}")
    smoothing = _checks.positive_finite("smoothing", smoothing)
    return reference.class_distribution(text, smoothing=smoothing)
