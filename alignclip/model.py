"""The dual-path AlignCLIP vision model over an open_clip VisionTransformer (SPEC.md section 7).

Every block runs one QKV projection on the packed in_proj weights and hands strided q/k/v views
of its output to `fused_alignclip_attention`. The last `dual_layers` blocks also carry the D-V
path: `x_dv = x_dv + ls_1(out_proj(dv))`, where `dv` is a zero-copy view of the QKV output. The
D-V path skips the MLP. The blocks in `aal_layers` return their CLS attention rows.

The two out_proj products of a dual block are either two GEMMs (the second reads the strided dv
view directly: no copy; the default) or one GEMM over the stacked rows (`out_proj_mode="stacked"`,
which first copies out and dv into one buffer). The benchmarks compare both.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from alignclip_kernels import fused_alignclip_attention, split_qkv


class VisualOutput(NamedTuple):
    tokens: torch.Tensor                   # [B, N, E] ln_post(x) @ proj, CLS first
    tokens_dv: Optional[torch.Tensor]      # [B, N, E] the D-V path, or None (align off)
    cls_attn: Optional[torch.Tensor]       # [L, B, H, N] fp32 CLS rows of the AAL layers


def _check_visual(visual):
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover - open_clip is a dependency
        raise ImportError("AlignCLIPVisual needs open_clip_torch") from exc
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"visual must be an open_clip VisionTransformer (a ViT image tower), got "
                        f"{type(visual).__name__}; ResNet and timm towers have no CLS attention")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("visual must pool the CLS token (pool_type='tok', no attentional pooler)")
    if getattr(visual, "final_ln_after_pool", False):
        raise ValueError("visual must apply ln_post before pooling (final_ln_after_pool=False)")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            raise TypeError(f"block {i} has no nn.MultiheadAttention (custom blocks are not supported)")


class AlignCLIPVisual(torch.nn.Module):
    """Wraps `visual` (no weight copies) and runs both paths; see the module docstring."""

    def __init__(self, visual, *, dual_layers=6, aal_layers=(0, 1, 2, 3, 4), out_proj_mode="split",
                 attention=fused_alignclip_attention):
        super().__init__()
        _check_visual(visual)
        depth = len(visual.transformer.resblocks)
        if isinstance(dual_layers, bool) or not isinstance(dual_layers, int) or not 0 <= dual_layers <= depth:
            raise ValueError(f"dual_layers must be an int in [0, {depth}] (the tower has {depth} blocks), "
                             f"got {dual_layers!r}")
        aal_layers = tuple(int(i) for i in aal_layers)
        if any(not 0 <= i < depth for i in aal_layers) or len(set(aal_layers)) != len(aal_layers):
            raise ValueError(f"aal_layers must be distinct block indices in [0, {depth}), got {aal_layers}")
        if out_proj_mode not in ("split", "stacked"):
            raise ValueError(f"out_proj_mode must be 'split' or 'stacked', got {out_proj_mode!r}")
        self.visual = visual
        self.dual_start = depth - dual_layers
        self.aal_layers = aal_layers
        self.out_proj_mode = out_proj_mode
        self.attention = attention   # same signature as fused_alignclip_attention (benchmarks swap it)

    @property
    def num_heads(self):
        return self.visual.transformer.resblocks[0].attn.num_heads

    def _embed(self, images):
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _attention(self, block, x, *, dual, probe):
        attn = block.attn
        b, n, c = x.shape
        h = attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, c // h)
        q, k, v = split_qkv(qkv)
        return self.attention(q, k, v, return_dv=dual, return_cls_attn=probe)

    def _out_proj(self, block, out, dv):
        proj = block.attn.out_proj
        if dv is None:
            return block.ls_1(proj(out)), None
        if self.out_proj_mode == "stacked":
            both = block.ls_1(proj(torch.stack([out, dv])))
            return both[0], both[1]
        return block.ls_1(proj(out)), block.ls_1(proj(dv))

    def forward(self, images, align=True):
        """`VisualOutput(tokens, tokens_dv, cls_attn)`; with `align=False` the original path only."""
        x = self._embed(images)
        x_dv = None
        rows = []
        for i, block in enumerate(self.visual.transformer.resblocks):
            dual = align and i >= self.dual_start
            probe = align and i in self.aal_layers
            if dual and x_dv is None:
                x_dv = x
            out, dv, cls_attn = self._attention(block, x, dual=dual, probe=probe)
            attn_out, dv_out = self._out_proj(block, out, dv)
            if dv_out is not None:
                x_dv = x_dv + dv_out
            x = x + attn_out
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            if cls_attn is not None:
                rows.append(cls_attn)
        v = self.visual
        tokens = v.ln_post(x) @ v.proj
        tokens_dv = v.ln_post(x_dv) @ v.proj if x_dv is not None else None
        if align and x_dv is None:   # dual_layers == 0: the D-V path is the original path
            tokens_dv = tokens
        return VisualOutput(tokens, tokens_dv, torch.stack(rows) if rows else None)

    def encode_image(self, images, normalize=True):
        """CLS features of the original path (evaluation), L2-normalised by default."""
        feats = self.forward(images, align=False).tokens[:, 0]
        return F.normalize(feats, dim=-1) if normalize else feats
