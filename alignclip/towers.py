"""What AlignCLIP needs from a ViT image tower, for each tower kind it drops into.

A `Tower` gives the dual-path model the embedding of an image batch, one `BlockParts` per
block (its norms, the packed q/k/v of its attention, the output projection, the layer scales and
the MLP) and the head that turns every token into a joint-space feature. Kinds:

- open_clip `VisionTransformer` with `nn.MultiheadAttention` blocks (open_clip ≤ 3.x) or with
  open_clip's own `Attention` (the main branch, 4.x), QK-norm included;
- timm `VisionTransformer` (`vit_base_patch16_clip_224` and the like), QK-norm included;
- Hugging Face `CLIPVisionModel` / `CLIPVisionModelWithProjection` (transformers 4.x and 5.x).

Variants the fused attention cannot express exactly (scaled-cosine attention, per-head scale,
norms inside the attention, gated attention, register tokens, pooling other than the CLS token)
are refused with an error naming the block and the feature.
"""
import re
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from alignclip_kernels import split_qkv
from alignclip_kernels.attention import kernel_head_dim_problem


class TowerError(TypeError):
    """A tower (or one of its blocks) the dual path cannot run exactly."""


def _is_identity(module):
    return module is None or isinstance(module, nn.Identity)


@dataclass
class BlockParts:
    """One pre-norm transformer block: x + ls_1(out_proj(attn(ln_1 x))), then x + ls_2(mlp(ln_2 x))."""
    ln_1: nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]      # ln_1(x) [B, N, C] -> packed [B, N, 3, H, D]
    q_norm: Optional[nn.Module]                      # per-head QK-norm, or None
    k_norm: Optional[nn.Module]
    num_heads: int
    scale: float
    out_proj: nn.Module
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module

    def attention_inputs(self, x):
        """q, k, v [B, H, N, D] of ln_1(x): views of one packed projection, QK-norm applied."""
        b, n, c = x.shape
        packed = self.qkv(self.ln_1(x)).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = split_qkv(packed)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class Tower:
    kind = "tower"
    blocks: List[BlockParts]

    def embed(self, images):
        raise NotImplementedError

    def head(self, x):
        """Every token [B, N, C] to the joint space [B, N, E] (final norm, then projection)."""
        raise NotImplementedError

    def forward(self, images):
        """The tower's own image features (the CLS token through its head)."""
        raise NotImplementedError

    @property
    def grad_checkpointing(self):
        """The tower's own activation-checkpointing flag (`set_grad_checkpointing` and the like)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable=True):
        raise NotImplementedError


def _linear_qkv(weight, bias):
    return lambda h: F.linear(h, weight, bias)


def _concatenated_qkv(attn):
    """Separate q/k/v projections (transformers' CLIP) as one GEMM over their concatenated
    weights: a [3C, C] copy per call, small next to the activations, and q, k, v stay views of
    one packed buffer (zero-copy D-V branch, one packed gradient)."""
    def qkv(h):
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        return F.linear(h, weight, bias)
    return qkv


class OpenCLIPTower(Tower):
    kind = "open_clip"

    def __init__(self, visual):
        self.visual = visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise TowerError("visual must pool the CLS token (pool_type='tok', no attentional pooler)")
        if getattr(visual, "final_ln_after_pool", False):
            raise TowerError("visual must apply ln_post before pooling (final_ln_after_pool=False)")
        self.blocks = [self._block(i, block) for i, block in enumerate(visual.transformer.resblocks)]

    @staticmethod
    def _block(i, block):
        attn = getattr(block, "attn", None)
        if not _is_identity(getattr(block, "ln_attn", None)):
            raise TowerError(f"block {i}: a norm after the attention (scale_attn) is not supported")
        if isinstance(attn, nn.MultiheadAttention):
            if not attn._qkv_same_embed_dim:
                raise TowerError(f"block {i}: separate q/k/v projection weights are not supported")
            return BlockParts(block.ln_1, _linear_qkv(attn.in_proj_weight, attn.in_proj_bias), None,
                              None, attn.num_heads, attn.head_dim ** -0.5, attn.out_proj, block.ls_1,
                              block.ln_2, block.mlp, block.ls_2)
        if attn is None or not hasattr(attn, "in_proj_bias") or not hasattr(attn, "out_proj"):
            raise TowerError(f"block {i}: attention {type(attn).__name__} is neither nn.MultiheadAttention "
                             "nor open_clip's Attention")
        for name, feature in (("logit_scale", "scaled-cosine attention"), ("head_scale", "per-head scale")):
            if getattr(attn, name, None) is not None:
                raise TowerError(f"block {i}: {feature} ({name}) cannot run in the fused attention")
        if not _is_identity(getattr(attn, "ln_inner", None)):
            raise TowerError(f"block {i}: the inner norm (ln_inner) cannot run in the fused attention")
        if getattr(attn, "in_proj_weight", None) is None:
            raise TowerError(f"block {i}: separate q/k/v projection weights are not supported")
        qk_norm = not _is_identity(getattr(attn, "ln_q", None))
        return BlockParts(block.ln_1, _linear_qkv(attn.in_proj_weight, attn.in_proj_bias),
                          attn.ln_q if qk_norm else None, attn.ln_k if qk_norm else None,
                          attn.num_heads, attn.scale, attn.out_proj, block.ls_1, block.ln_2,
                          block.mlp, block.ls_2)

    def embed(self, images):
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def head(self, x):
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def forward(self, images):
        return self.visual(images)

    @property
    def grad_checkpointing(self):
        return bool(getattr(self.visual.transformer, "grad_checkpointing", False))

    def set_grad_checkpointing(self, enable=True):
        self.visual.set_grad_checkpointing(enable)


# timm tags of image classifiers fine-tuned from CLIP (laion2b_ft_in12k_in1k, openai_ft_in1k, ...)
CLASSIFIER_TAG = re.compile(r"(^|_)ft(_|$)|in1k|in12k|in21k|in22k")


class TimmTower(Tower):
    kind = "timm"

    def __init__(self, model):
        from timm.models.vision_transformer import Block

        self.model = model
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag") or ""
        if getattr(model, "num_classes", 0) and CLASSIFIER_TAG.search(tag):
            name = (model.pretrained_cfg.get("architecture") or type(model).__name__) + f".{tag}"
            raise TowerError(f"timm model {name} ends in a {model.num_classes}-class classifier head, not CLIP's "
                             "image projection: create it with a CLIP tag (e.g. vit_base_patch16_clip_224.openai)")
        if getattr(model, "global_pool", "token") != "token":
            raise TowerError(f"timm model must pool the CLS token (global_pool='token'), got "
                             f"global_pool={model.global_pool!r}")
        if getattr(model, "num_prefix_tokens", 1) != 1 or model.cls_token is None:
            raise TowerError("timm model must have one CLS token and no register tokens")
        if not _is_identity(getattr(model, "fc_norm", None)):
            raise TowerError("timm model must not norm the pooled token again (fc_norm)")
        self.blocks = []
        for i, block in enumerate(model.blocks):
            if type(block) is not Block:
                raise TowerError(f"block {i}: {type(block).__name__} is not timm's pre-norm Block")
            attn = block.attn
            if not _is_identity(getattr(attn, "norm", None)):
                raise TowerError(f"block {i}: the attention's output norm (scale_norm) is not supported")
            if getattr(attn, "gate", None) is not None:
                raise TowerError(f"block {i}: gated attention is not supported")
            qk_norm = not _is_identity(attn.q_norm)
            self.blocks.append(BlockParts(
                block.norm1, attn.qkv, attn.q_norm if qk_norm else None,
                attn.k_norm if qk_norm else None, attn.num_heads, attn.scale, attn.proj,
                nn.Sequential(block.ls1, block.drop_path1), block.norm2, block.mlp,
                nn.Sequential(block.ls2, block.drop_path2)))

    def embed(self, images):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def head(self, x):
        return self.model.head(self.model.norm(x))

    def forward(self, images):
        return self.model(images)

    @property
    def grad_checkpointing(self):
        return bool(getattr(self.model, "grad_checkpointing", False))

    def set_grad_checkpointing(self, enable=True):
        self.model.set_grad_checkpointing(enable)


class HFCLIPTower(Tower):
    kind = "hf"

    def __init__(self, model):
        self.model = model
        if getattr(model, "visual_projection", None) is None:
            raise TowerError(f"{type(model).__name__} has no visual projection, so its tokens are not in CLIP's joint "
                             "space: load CLIPVisionModelWithProjection")
        core = model.vision_model if hasattr(model, "vision_model") else model
        self.core = core
        self.projection = model.visual_projection
        self.blocks = []
        for layer in core.encoder.layers:
            attn = layer.self_attn
            self.blocks.append(BlockParts(
                layer.layer_norm1, _concatenated_qkv(attn), None, None, attn.num_heads, attn.scale,
                attn.out_proj, nn.Identity(), layer.layer_norm2, layer.mlp, nn.Identity()))

    def embed(self, images):
        return self.core.pre_layrnorm(self.core.embeddings(images))

    def head(self, x):
        return self.projection(self.core.post_layernorm(x))

    def forward(self, images):
        return self.model(pixel_values=images).image_embeds

    @property
    def grad_checkpointing(self):
        return bool(getattr(self.core.encoder, "gradient_checkpointing", False))

    def set_grad_checkpointing(self, enable=True):
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


def tower_for(visual):
    """The adapter for `visual`, or a TowerError saying what is supported (the kind of tower,
    and a head dim the kernels take in every block)."""
    tower = _adapter(visual)
    for i, block in enumerate(tower.blocks):
        width = block.out_proj.in_features
        problem = kernel_head_dim_problem(width // block.num_heads)
        if problem:
            raise TowerError(f"{type(visual).__name__} block {i} ({block.num_heads} heads of width {width}): {problem}")
    return tower


def _adapter(visual):
    kinds = []
    try:
        from open_clip.transformer import VisionTransformer as OpenCLIPViT

        if isinstance(visual, OpenCLIPViT):
            return OpenCLIPTower(visual)
        kinds.append("open_clip VisionTransformer")
    except ImportError:
        pass
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        if isinstance(visual, TimmViT):
            return TimmTower(visual)
        kinds.append("timm VisionTransformer")
    except ImportError:
        pass
    try:
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        if isinstance(visual, (CLIPVisionModel, CLIPVisionModelWithProjection)):
            return HFCLIPTower(visual)
        kinds.append("transformers CLIPVisionModel[WithProjection]")
    except ImportError:
        pass
    raise TowerError(f"visual must be a ViT image tower ({', '.join(kinds)}), got "
                     f"{type(visual).__name__}; ResNet towers have no CLS attention")
