r"""Token-text similarity target G: how much each patch of the D-V path matches the label's text.

For tokens u [B, P, E] (not normalised), text t [K, E] and labels y [B]:

    û_n = u_n / max(‖u_n‖, ε),   t̂ = t_y / max(‖t_y‖, ε),   c_n = û_n · t̂
    G_n = softmax_n(c_n / τ)                                   [B, P] fp32, per image

ε = 1e-12 as `F.normalize`. Differentiable in tokens and text (AlignCLIP does not detach G).

Forward, one launch over (image, split): the programs of an image share its BLOCK_P-row
blocks, stream E in BLOCK_E chunks, store z_n = c_n/τ into G and (c_n, ‖u_n‖) for the backward,
and publish a partial (max, Σexp); the last of them to finish normalises the image's G in
place. Backward, one launch over (image, split); each program reads Σ_m G_m dG_m of its image
(P floats) itself:

    dc_n = G_n (dG_n − Σ_m G_m dG_m) / τ
    du_n = dc_n (t̂ − [‖u_n‖ ≥ ε] c_n û_n) / max(‖u_n‖, ε)
    dt_y += (Σ_n dc_n û_n − [‖t_y‖ ≥ ε] (Σ_n dc_n c_n) t̂) / max(‖t_y‖, ε)        (atomic)

Necessary multiply-adds (`roofline.token_text_target`): B·P·E forward (û_n · t̂); the backward
reuses the saved c_n and ‖u_n‖ and needs B·P·E only for d(text).

A label outside [0, K) gives a NaN row of G (the kernels never read out of bounds); on the CPU
it is refused before any work.
"""
import torch
from torch import Tensor

from . import _checks, reference
from ._runtime import HAS_TRITON, cuda_arch, deterministic_flag, loss_pytorch_path, next_pow2, on_device, runs_triton
from .kernel_utils import LaunchConfig, placeholder, refuse_double_backward, rows_by_label, split_blocks
from .paper import TEMPERATURE

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernel_utils import accumulate, combine_logsumexp, gemv, gemv_t, inv_norm, last_to_arrive, split_block

EPS = reference.NORM_EPS


def target_config(e, dtype, device):
    """BLOCK_P rows × BLOCK_E columns per tile: a [16, 256] fp32 tile is 32 registers a thread
    (fp32 inputs take [16, 128]: the d(text) backward spills on Triton 3.6's ptxas otherwise)."""
    if cuda_arch(device) is None:
        return LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_P=16, BLOCK_E=min(32, next_pow2(e)))
    wide = dtype == torch.float32
    return LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_P=16, BLOCK_E=min(128 if wide else 256, next_pow2(e)))


if HAS_TRITON:

    @triton.jit
    def label_row(Labels, b, K):
        """(y, ok): the label of image b, clamped into [0, K) so nothing reads out of bounds."""
        y = tl.load(Labels + b)
        ok = (y >= 0) & (y < K)
        return tl.where(ok, y, 0), ok

    @triton.jit
    def text_inv_norm(Text_row, stride_xe, E, eps, BLOCK_E: tl.constexpr):
        """(1 / max(‖t‖, ε), ‖t‖) of one text row."""
        tt = tl.zeros([BLOCK_E], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            t = tl.load(Text_row + offs_e * stride_xe, mask=offs_e < E, other=0.0).to(tl.float32)
            tt += t * t
        total = tl.sum(tt, axis=0)
        return inv_norm(total, eps), tl.sqrt(total)

    @triton.jit
    def row_cosines(Tok, stride_tp, stride_te, Text_row, stride_xe, offs_p, p_mask, E, inv_nt, eps,
                    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
        """(c_n, ‖u_n‖) for a block of token rows: c_n = û_n · t̂, streamed over E."""
        dot = tl.zeros([BLOCK_P], tl.float32)
        uu = tl.zeros([BLOCK_P], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            u = tl.load(Tok + offs_p[:, None] * stride_tp + offs_e[None, :] * stride_te,
                        mask=p_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
            t = tl.load(Text_row + offs_e * stride_xe, mask=e_mask, other=0.0)
            dot += gemv(u, t)
            uu += tl.sum(u * u, axis=1)
        return dot * inv_norm(uu, eps) * inv_nt, tl.sqrt(uu)

    @triton.jit
    def cosine_backward(Tok, stride_tp, stride_te, Text_row, stride_xe, DTok, stride_dp, stride_de,
                        DText_row, offs_p, p_mask, dc, c, nu, E, inv_nt, nt, eps,
                        BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, TEXT_GRAD: tl.constexpr,
                        EXACT_ORDER: tl.constexpr):
        """Store du_n for a block of rows given dc_n = dL/dc_n; with TEXT_GRAD, add the block's
        part of d(text row) into `DText_row` (see `text_grad_row`)."""
        inv_nu = inv_norm(nu * nu, eps)
        radial = tl.where(nu >= eps, c, 0.0)
        text_radial = tl.where(nt >= eps, tl.sum(dc * c, axis=0), 0.0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            mask = p_mask[:, None] & e_mask[None, :]
            u_hat = tl.load(Tok + offs_p[:, None] * stride_tp + offs_e[None, :] * stride_te,
                            mask=mask, other=0.0).to(tl.float32) * inv_nu[:, None]
            t_hat = tl.load(Text_row + offs_e * stride_xe, mask=e_mask, other=0.0).to(tl.float32) * inv_nt
            du = dc[:, None] * (t_hat[None, :] - radial[:, None] * u_hat) * inv_nu[:, None]
            tl.store(DTok + offs_p[:, None] * stride_dp + offs_e[None, :] * stride_de,
                     du.to(DTok.dtype.element_ty), mask=mask)
            if TEXT_GRAD:
                dt = (gemv_t(u_hat, dc) - text_radial * t_hat) * inv_nt
                accumulate(DText_row + offs_e, dt, e_mask, EXACT_ORDER)

    @triton.jit
    def text_grad_row(DText, y, b, split, E, EXACT_ORDER: tl.constexpr):
        """Where a program adds its part of d(text row y): the row itself (atomics), or in the
        deterministic mode a row of its own, [B, splits, E], which `text_row_grads` combines."""
        if EXACT_ORDER:
            return DText + (b * tl.num_programs(1) + split) * E
        return DText + y * E

    @triton.jit
    def normalize_rows(G, P, m_z, l_z, label_ok, BLOCK_P: tl.constexpr):
        """G_n = exp(z_n − m_z) / l_z in place over an image's P entries (NaN for a bad label)."""
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            z = tl.load(G + offs_p, mask=p_mask, other=0.0, cache_modifier=".cg")
            g = tl.where(label_ok, tl.exp(z - m_z) / l_z, float("nan"))
            tl.store(G + offs_p, g, mask=p_mask)

    @triton.jit
    def _target_fwd_kernel(
        Tok, Text, Labels, G, RowStats, Partial, Tickets,
        stride_tb, stride_tp, stride_te,
        stride_xk, stride_xe,
        P, E, K, n_blocks, blocks_per_program, inv_temp, eps,
        BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, SPLIT: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        y, label_ok = label_row(Labels, b, K)
        Text_row = Text + y * stride_xk
        inv_nt, _ = text_inv_norm(Text_row, stride_xe, E, eps, BLOCK_E)
        Tok += b * stride_tb
        G += b * P
        RowStats += b * P * 2
        m_z = float("-inf")
        l_z = 0.0
        for i in range(0, blocks_per_program):
            valid, offs_p, p_mask = split_block(split, i, blocks_per_program, n_blocks, P, BLOCK_P)
            if valid:
                c, nu = row_cosines(Tok, stride_tp, stride_te, Text_row, stride_xe, offs_p, p_mask,
                                    E, inv_nt, eps, BLOCK_P, BLOCK_E)
                z = tl.where(p_mask, c * inv_temp, float("-inf"))
                tl.store(G + offs_p, z, mask=p_mask)
                tl.store(RowStats + offs_p * 2, c, mask=p_mask)
                tl.store(RowStats + offs_p * 2 + 1, nu, mask=p_mask)
                m_new = tl.maximum(m_z, tl.max(z, axis=0))
                l_z = l_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m_z = m_new
        if SPLIT:
            n_splits = tl.num_programs(1)
            tl.store(Partial + (b * n_splits + split) * 2, m_z)
            tl.store(Partial + (b * n_splits + split) * 2 + 1, l_z)
            if last_to_arrive(Tickets, b, n_splits):
                m_z, l_z = combine_logsumexp(Partial + b * n_splits * 2, n_splits, 2)
                normalize_rows(G, P, m_z, l_z, label_ok, BLOCK_P)
        else:
            tl.debug_barrier()
            normalize_rows(G, P, m_z, l_z, label_ok, BLOCK_P)

    @triton.jit
    def _target_bwd_kernel(
        Tok, Text, Labels, G, DG, RowStats, DTok, DText,
        stride_tb, stride_tp, stride_te,
        stride_xk, stride_xe,
        stride_dgb, stride_dgp,
        stride_db, stride_dp, stride_de,
        P, E, K, n_blocks, blocks_per_program, inv_temp, eps,
        BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, TEXT_GRAD: tl.constexpr,
        EXACT_ORDER: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        y, _ = label_row(Labels, b, K)
        Text_row = Text + y * stride_xk
        inv_nt, nt = text_inv_norm(Text_row, stride_xe, E, eps, BLOCK_E)
        G += b * P
        DG += b * stride_dgb
        g_dg = 0.0
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            g = tl.load(G + offs_p, mask=p_mask, other=0.0)
            dg = tl.load(DG + offs_p * stride_dgp, mask=p_mask, other=0.0).to(tl.float32)
            g_dg += tl.sum(g * dg, axis=0)
        for i in range(0, blocks_per_program):
            valid, offs_p, p_mask = split_block(split, i, blocks_per_program, n_blocks, P, BLOCK_P)
            if valid:
                g = tl.load(G + offs_p, mask=p_mask, other=0.0)
                dg = tl.load(DG + offs_p * stride_dgp, mask=p_mask, other=0.0).to(tl.float32)
                dc = tl.where(p_mask, g * (dg - g_dg) * inv_temp, 0.0)
                c = tl.load(RowStats + (b * P + offs_p) * 2, mask=p_mask, other=0.0)
                nu = tl.load(RowStats + (b * P + offs_p) * 2 + 1, mask=p_mask, other=1.0)
                cosine_backward(Tok + b * stride_tb, stride_tp, stride_te, Text_row, stride_xe,
                                DTok + b * stride_db, stride_dp, stride_de,
                                text_grad_row(DText, y, b, split, E, EXACT_ORDER), offs_p, p_mask, dc,
                                c, nu, E, inv_nt, nt, eps, BLOCK_P, BLOCK_E, TEXT_GRAD, EXACT_ORDER)


def _target_fwd(tokens, text, labels, temperature, config=None):
    """(G [B, P] fp32, row stats [B, P, 2] fp32: (c_n, ‖u_n‖) kept for the backward)."""
    b, p, e = tokens.shape
    config = config or target_config(e, tokens.dtype, tokens.device)
    n_blocks = triton.cdiv(p, config["BLOCK_P"])
    splits, per_program = split_blocks(b, n_blocks, tokens.device)
    g = torch.empty((b, p), dtype=torch.float32, device=tokens.device)
    row_stats = torch.empty((b, p, 2), dtype=torch.float32, device=tokens.device)
    partial = torch.empty((b, splits, 2), dtype=torch.float32, device=tokens.device)
    tickets = torch.zeros((b,), dtype=torch.int32, device=tokens.device)
    with on_device(tokens):
        _target_fwd_kernel[(b, splits)](
            Tok=tokens, Text=text, Labels=labels, G=g, RowStats=row_stats, Partial=partial,
            Tickets=tickets,
            stride_tb=tokens.stride(0), stride_tp=tokens.stride(1), stride_te=tokens.stride(2),
            stride_xk=text.stride(0), stride_xe=text.stride(1),
            P=p, E=e, K=text.shape[0], n_blocks=n_blocks, blocks_per_program=per_program,
            inv_temp=1.0 / temperature, eps=EPS, SPLIT=splits > 1, **config.kwargs,
        )
    return g, row_stats


def text_row_grads(b, splits, text, exact_order):
    """The buffer the backward adds d(text rows) into: [K, E] fp32 zeros for atomics, or a row
    per program [B, splits, E] in the deterministic mode (`text_grad_row`)."""
    shape = (b, splits, text.shape[1]) if exact_order else text.shape
    return torch.zeros(shape, dtype=torch.float32, device=text.device)


def combined_text_grads(grads, labels, num_classes, exact_order):
    """d text [K, E] fp32 from `text_row_grads`' buffer: the programs' rows summed per image,
    then per class in image order."""
    return rows_by_label(grads.sum(1), labels, num_classes) if exact_order else grads


def _target_bwd(dg, tokens, text, labels, g, row_stats, temperature, text_grad, exact_order=False,
                config=None):
    """(d tokens, d text fp32 or None)."""
    b, p, e = tokens.shape
    config = config or target_config(e, tokens.dtype, tokens.device)
    n_blocks = triton.cdiv(p, config["BLOCK_P"])
    splits, per_program = split_blocks(b, n_blocks, tokens.device)
    dtok = torch.empty((b, p, e), dtype=tokens.dtype, device=tokens.device)
    dtext = text_row_grads(b, splits, text, exact_order) if text_grad else placeholder(tokens.device)
    with on_device(tokens):
        _target_bwd_kernel[(b, splits)](
            Tok=tokens, Text=text, Labels=labels, G=g, DG=dg, RowStats=row_stats, DTok=dtok,
            DText=dtext,
            stride_tb=tokens.stride(0), stride_tp=tokens.stride(1), stride_te=tokens.stride(2),
            stride_xk=text.stride(0), stride_xe=text.stride(1),
            stride_dgb=dg.stride(0), stride_dgp=dg.stride(1),
            stride_db=dtok.stride(0), stride_dp=dtok.stride(1), stride_de=dtok.stride(2),
            P=p, E=e, K=text.shape[0], n_blocks=n_blocks, blocks_per_program=per_program,
            inv_temp=1.0 / temperature, eps=EPS, TEXT_GRAD=text_grad, EXACT_ORDER=exact_order,
            **config.kwargs,
        )
        if not text_grad:
            return dtok, None
        return dtok, combined_text_grads(dtext, labels, text.shape[0], exact_order)


@torch.library.custom_op("alignclip::token_text_target", mutates_args=())
def _target_op(tokens: Tensor, text: Tensor, labels: Tensor, temperature: float,
               exact_order: bool) -> tuple[Tensor, Tensor]:
    return _target_fwd(tokens, text, labels, temperature)


@_target_op.register_fake
def _(tokens, text, labels, temperature, exact_order):
    b, p, _ = tokens.shape
    return tokens.new_empty((b, p), dtype=torch.float32), tokens.new_empty((b, p, 2), dtype=torch.float32)


@torch.library.custom_op("alignclip::token_text_target_backward", mutates_args=())
def _target_bwd_op(dg: Tensor, tokens: Tensor, text: Tensor, labels: Tensor, g: Tensor,
                   row_stats: Tensor, temperature: float, text_grad: bool,
                   exact_order: bool) -> tuple[Tensor, Tensor]:
    dtok, dtext = _target_bwd(dg, tokens, text, labels, g, row_stats, temperature, text_grad, exact_order)
    return dtok, dtext.to(text.dtype) if text_grad else text.new_empty(0)


@_target_bwd_op.register_fake
def _(dg, tokens, text, labels, g, row_stats, temperature, text_grad, exact_order):
    return torch.empty_like(tokens), text.new_empty(text.shape if text_grad else (0,))


def _setup_context(ctx, inputs, output):
    tokens, text, labels, temperature, exact_order = inputs
    g, row_stats = output
    ctx.save_for_backward(tokens, text, labels, g, row_stats)
    ctx.temperature, ctx.exact_order = temperature, exact_order


def _backward(ctx, dg, _d_row_stats):
    refuse_double_backward("token_text_target")
    tokens, text, labels, g, row_stats = ctx.saved_tensors
    text_grad = ctx.needs_input_grad[1]
    dtok, dtext = _target_bwd_op(dg, tokens, text, labels, g, row_stats, ctx.temperature, text_grad,
                                 ctx.exact_order)
    return dtok, (dtext if text_grad else None), None, None, None


_target_op.register_autograd(_backward, setup_context=_setup_context)


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


def token_text_target(tokens, text, labels, *, temperature=TEMPERATURE, deterministic=None):
    """G [B, P] fp32: softmax over patches of cos(tokens[b, n], text[labels[b]]) / temperature.

    `deterministic` (default: `torch.use_deterministic_algorithms`' setting): d(text) without
    float atomics."""
    temperature = _check(tokens, text, labels, temperature)
    exact_order = deterministic_flag(deterministic)
    if not runs_triton(tokens):
        return loss_pytorch_path(reference.token_text_target, tokens, text, labels,
                                 temperature=temperature)
    return _target_op(tokens, text, labels, temperature, exact_order)[0]
