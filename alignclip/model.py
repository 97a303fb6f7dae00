"""The dual-path AlignCLIP vision model over any supported ViT tower (see `towers.py`).

Every block runs one QKV projection and hands strided q/k/v views of its output to
`fused_alignclip_attention`. The last `dual_layers` blocks also carry the D-V path, the
query-key product replaced by the identity so that every token keeps its own value:

    h = ln_1(x);  out, dv, p = fused_alignclip_attention(q(h), k(h), v(h))
    x_dv = x_dv + ls_1(out_proj(dv))          (x_dv = x at the first dual block; no MLP)
    x    = x + ls_1(out_proj(out));  x = x + ls_2(mlp(ln_2 x))

`dv` is a zero-copy view of the QKV output. The blocks in `aal_layers` return their CLS
attention rows.

`second_path="vvv"` (the ablation against CLIP Surgery's second path, which the authors' rebuttal
compares on VLCS) replaces the identity by V-V-V self-attention over the same values,
`softmax(s · v vᵀ) v` through the fused attention (no probe rows, no dv), at the block's scale:

    x_dv = x_dv + ls_1(out_proj(softmax(s · v vᵀ) v))

The CLS rows the AAL aligns are still the original path's, and G comes from the second path's
tokens, whichever it is. Outputs: `tokens = head(x)` and `tokens_dv = head(x_dv)` for all N tokens
(head = the tower's final norm and projection) and `cls_attn` [L, B, H, N]. With `align=False`
the original path alone runs, and its CLS token equals the tower's own output.

Activation checkpointing follows the tower's own flag (open_clip's and timm's
`set_grad_checkpointing`, transformers' `gradient_checkpointing_enable`; or
`AlignCLIPVisual.set_grad_checkpointing`): each block, both paths and its CLS rows, is then
recomputed in backward (non-reentrant `torch.utils.checkpoint`), so only the block inputs are
saved; values and gradients are those of the un-checkpointed model.

The two out_proj products of a dual block are two GEMMs (the second reads the strided dv view
directly: no copy; the default) or one GEMM over the stacked rows (`out_proj_mode="stacked"`,
which first copies out and dv into one buffer); the benchmarks compare both.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignclip_kernels import fused_alignclip_attention

from .towers import tower_for

SECOND_PATHS = ("dv", "vvv")


class VisualOutput(NamedTuple):
    tokens: torch.Tensor                   # [B, N, E] the original path, CLS first
    tokens_dv: Optional[torch.Tensor]      # [B, N, E] the D-V path, or None (align off)
    cls_attn: Optional[torch.Tensor]       # [L, B, H, N] fp32 CLS rows of the AAL layers


class AlignCLIPVisual(torch.nn.Module):
    """Wraps an image tower (no weight copies) and runs both paths; see the module docstring.

    `visual`: an open_clip `VisionTransformer`, a timm `VisionTransformer` or a transformers
    `CLIPVisionModel[WithProjection]`. `attention` has the signature of
    `fused_alignclip_attention` (the benchmarks swap in the authors' path).
    """

    def __init__(self, visual, *, dual_layers=6, aal_layers=(0, 1, 2, 3, 4), out_proj_mode="split",
                 second_path="dv", attention=fused_alignclip_attention):
        super().__init__()
        self.tower = tower_for(visual)
        depth = len(self.tower.blocks)
        if isinstance(dual_layers, bool) or not isinstance(dual_layers, int) or not 0 <= dual_layers <= depth:
            raise ValueError(f"dual_layers must be an int in [0, {depth}] (the tower has {depth} blocks), "
                             f"got {dual_layers!r}")
        aal_layers = tuple(int(i) for i in aal_layers)
        if any(not 0 <= i < depth for i in aal_layers) or len(set(aal_layers)) != len(aal_layers):
            raise ValueError(f"aal_layers must be distinct block indices in [0, {depth}), got {aal_layers}")
        if out_proj_mode not in ("split", "stacked"):
            raise ValueError(f"out_proj_mode must be 'split' or 'stacked', got {out_proj_mode!r}")
        if second_path not in SECOND_PATHS:
            raise ValueError(f"second_path must be one of {', '.join(SECOND_PATHS)}, got {second_path!r}")
        self.visual = visual
        self.dual_start = depth - dual_layers
        self.aal_layers = aal_layers
        self.out_proj_mode = out_proj_mode
        self.second_path = second_path
        self.attention = attention

    @property
    def num_heads(self):
        return self.tower.blocks[0].num_heads

    def _out_proj(self, block, out, dv):
        if dv is None:
            return block.ls_1(block.out_proj(out)), None
        if self.out_proj_mode == "stacked":
            both = block.ls_1(block.out_proj(torch.stack([out, dv])))
            return both[0], both[1]
        return block.ls_1(block.out_proj(out)), block.ls_1(block.out_proj(dv))

    def set_grad_checkpointing(self, enable=True):
        """Recompute every block in backward (sets the tower's own flag, which is what is read)."""
        self.tower.set_grad_checkpointing(enable)

    def _block(self, block, x, x_dv, dual, probe):
        """One block on both paths: (x, x_dv, CLS rows or None)."""
        if dual and x_dv is None:
            x_dv = x
        q, k, v = block.attention_inputs(x)
        vvv = dual and self.second_path == "vvv"
        out, dv, cls_attn = self.attention(q, k, v, scale=block.scale, return_dv=dual and not vvv,
                                           return_cls_attn=probe)
        if vvv:
            dv, _, _ = self.attention(v, v, v, scale=block.scale, return_dv=False, return_cls_attn=False)
        attn_out, dv_out = self._out_proj(block, out, dv)
        if dv_out is not None:
            x_dv = x_dv + dv_out
        x = x + attn_out
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, x_dv, cls_attn

    def forward(self, images, align=True):
        """`VisualOutput(tokens, tokens_dv, cls_attn)`; with `align=False` the original path only."""
        x = self.tower.embed(images)
        x_dv = None
        rows = []
        recompute = torch.is_grad_enabled() and self.tower.grad_checkpointing
        for i, block in enumerate(self.tower.blocks):
            args = (block, x, x_dv, align and i >= self.dual_start, align and i in self.aal_layers)
            if recompute:
                x, x_dv, cls_attn = checkpoint(self._block, *args, use_reentrant=False)
            else:
                x, x_dv, cls_attn = self._block(*args)
            if cls_attn is not None:
                rows.append(cls_attn)
        tokens = self.tower.head(x)
        tokens_dv = self.tower.head(x_dv) if x_dv is not None else None
        if align and x_dv is None:   # dual_layers == 0: the D-V path is the original path
            tokens_dv = tokens
        return VisualOutput(tokens, tokens_dv, torch.stack(rows) if rows else None)

    def encode_image(self, images, normalize=True):
        """CLS features of the original path (evaluation), L2-normalised by default."""
        feats = self.forward(images, align=False).tokens[:, 0]
        return F.normalize(feats, dim=-1) if normalize else feats
