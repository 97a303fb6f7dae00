"""AlignCLIPVisual against stock open_clip and a float64 loop over the blocks (reference ops)."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from alignclip import AlignCLIPLoss, AlignCLIPVisual
from alignclip_kernels import reference as ref


def tiny_vit(ls_init_value=None, layers=4):
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=64, layers=layers, heads=2,
                             mlp_ratio=2.0, ls_init_value=ls_init_value, output_dim=32).eval()


def loop_reference(visual, images, dual_layers, aal_layers):
    """SPEC section 7 written out in float64 with the reference attention."""
    v = copy.deepcopy(visual).double()
    x = v.conv1(images.double()).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    blocks = v.transformer.resblocks
    x_dv, rows = None, []
    for i, blk in enumerate(blocks):
        b, n, c = x.shape
        h = blk.attn.num_heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        q, k, val = qkv.view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        out, dv, cls = ref.fused_alignclip_attention(q, k, val)
        if i >= len(blocks) - dual_layers:
            x_dv = x if x_dv is None else x_dv
            x_dv = x_dv + blk.ls_1(blk.attn.out_proj(dv))
        x = x + blk.ls_1(blk.attn.out_proj(out))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        if i in aal_layers:
            rows.append(cls)
    return v.ln_post(x) @ v.proj, v.ln_post(x_dv) @ v.proj, torch.stack(rows)


def _close(got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["split", "stacked"])
@pytest.mark.parametrize("ls", [None, 0.1])
def test_dual_path_matches_float64_loop(ls, mode):
    visual = tiny_vit(ls_init_value=ls)
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 2), out_proj_mode=mode)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(images)
    tokens, tokens_dv, cls = loop_reference(visual, images, 2, (0, 2))
    _close(out.tokens, tokens)
    _close(out.tokens_dv, tokens_dv)
    _close(out.cls_attn, cls)
    assert out.cls_attn.shape == (2, 2, 2, 17) and out.cls_attn.dtype == torch.float32


def test_vit_b32_dual_path_matches_float64_loop():
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    model = AlignCLIPVisual(visual)        # the authors' defaults: 6 dual blocks, AAL on 0..4
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(images)
    tokens, tokens_dv, cls = loop_reference(visual, images, 6, (0, 1, 2, 3, 4))
    _close(out.tokens, tokens, rtol=1e-4, atol=1e-4)
    _close(out.tokens_dv, tokens_dv, rtol=1e-4, atol=1e-4)
    _close(out.cls_attn, cls, rtol=1e-4, atol=1e-6)


def test_align_off_equals_stock_open_clip_vit_b32():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    model = AlignCLIPVisual(clip.visual)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = clip.encode_image(images)
        got = model.encode_image(images, normalize=False)
        full = model(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert full.tokens.shape == (1, 50, 512) and full.cls_attn.shape == (5, 1, 12, 50)
    torch.testing.assert_close(full.tokens[:, 0], want, rtol=1e-4, atol=1e-5)


def test_wraps_without_copying_weights():
    visual = tiny_vit()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
    assert model.visual is visual
    assert {id(p) for p in model.parameters()} == {id(p) for p in visual.parameters()}


def test_gradients_reach_every_parameter_through_the_loss():
    visual = tiny_vit()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
    text = F.normalize(torch.randn(3, 32), dim=-1)
    loss = AlignCLIPLoss(text)
    terms = loss(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    assert all(torch.isfinite(t) for t in terms[:4])
    terms.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_refuses_non_vit_towers_and_bad_layers():
    with pytest.raises(TypeError, match="VisionTransformer"):
        AlignCLIPVisual(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dual_layers"):
        AlignCLIPVisual(tiny_vit(), dual_layers=9)
    with pytest.raises(ValueError, match="aal_layers"):
        AlignCLIPVisual(tiny_vit(), dual_layers=2, aal_layers=(0, 7))
