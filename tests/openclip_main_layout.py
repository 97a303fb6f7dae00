"""A block with the layout and forward of open_clip's main-branch (4.x) `Attention` and
`ResidualAttentionBlock`, which are not on PyPI yet: `in_proj_weight`/`in_proj_bias`,
`out_proj`, `num_heads`, `scale`, optional per-head QK-norm `ln_q`/`ln_k`, and the switches
for scaled-cosine attention (`logit_scale`), per-head scale (`head_scale`) and `ln_inner`."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, scaled_cosine=False, scale_heads=False,
                 inner_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) / math.sqrt(dim))
        self.in_proj_bias = nn.Parameter(torch.randn(3 * dim) * 0.02)
        self.ln_q = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.logit_scale = nn.Parameter(torch.zeros(num_heads, 1, 1)) if scaled_cosine else None
        self.head_scale = nn.Parameter(torch.ones(num_heads, 1, 1)) if scale_heads else None
        self.ln_inner = nn.LayerNorm(dim) if inner_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.logit_scale is not None:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            out = (attn * self.logit_scale.exp()).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(self.ln_q(q), self.ln_k(k), v, scale=self.scale)
        if self.head_scale is not None:
            out = out * self.head_scale
        return self.out_proj(self.ln_inner(out.transpose(1, 2).reshape(b, n, c)))


class ResidualAttentionBlock(nn.Module):
    """Built from an open_clip 3.x block: same norms, MLP, layer scales and QKV weights."""

    def __init__(self, old, **attn_options):
        super().__init__()
        dim = old.ln_1.normalized_shape[0]
        self.ln_1, self.ls_1, self.ln_2, self.mlp, self.ls_2 = old.ln_1, old.ls_1, old.ln_2, old.mlp, old.ls_2
        self.attn = Attention(dim, old.attn.num_heads, **attn_options)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(old.attn.in_proj_weight)
            self.attn.in_proj_bias.copy_(old.attn.in_proj_bias)
            self.attn.out_proj.load_state_dict(old.attn.out_proj.state_dict())

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))
