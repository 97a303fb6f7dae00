"""AlignCLIPVisual over every tower kind against a float64 loop over the tower's own blocks (the
original path through each block's native forward, the D-V path and the CLS rows from the
block's own projections); with align off it equals the tower's own forward."""
import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

import openclip_main_layout
from alignclip import AlignCLIPLoss, AlignCLIPVisual
from alignclip.towers import TowerError
from alignclip_kernels import reference as ref
from utils import gen


def open_clip_vit(ls_init_value=None, layers=4, width=64, heads=2):
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=width, layers=layers, heads=heads,
                             mlp_ratio=2.0, ls_init_value=ls_init_value, output_dim=32).eval()


def open_clip_main_vit(**attn_options):
    visual = open_clip_vit()
    blocks = visual.transformer.resblocks
    for i in range(len(blocks)):
        blocks[i] = openclip_main_layout.ResidualAttentionBlock(blocks[i], **attn_options)
    return visual.eval()


def timm_vit(qk_norm=False):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, pre_norm=True,
        global_pool="token", num_classes=32, qkv_bias=True, qk_norm=qk_norm, init_values=0.1).eval()


def hf_clip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=32, patch_size=8,
                                           projection_dim=32)
    return transformers.CLIPVisionModelWithProjection(config).eval()


# -- a float64 oracle per tower kind: the block's own forward, value and query/key projections --

def _heads(t, h):
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def _open_clip_native(visual):
    def embed(x):
        return visual._embeds(x) if hasattr(visual, "_embeds") else None

    def qkv(block, h):
        attn = block.attn
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
        ln_q, ln_k = getattr(attn, "ln_q", torch.nn.Identity()), getattr(attn, "ln_k", torch.nn.Identity())
        return ln_q(q), ln_k(k), v

    return dict(embed=embed, blocks=list(visual.transformer.resblocks),
                run=lambda block, x: block(x), qkv=qkv, ln_1=lambda b: b.ln_1,
                dv_out=lambda b, dv: b.ls_1(b.attn.out_proj(dv)),
                head=lambda x: visual.ln_post(x) @ visual.proj)


def _timm_native(model):
    def qkv(block, h):
        q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
        q, k, v = (_heads(t, block.attn.num_heads) for t in (q, k, v))
        return block.attn.q_norm(q), block.attn.k_norm(k), v

    return dict(embed=lambda x: model.norm_pre(model._pos_embed(model.patch_embed(x))),
                blocks=list(model.blocks), run=lambda block, x: block(x), qkv=qkv,
                ln_1=lambda b: b.norm1, dv_out=lambda b, dv: b.ls1(b.attn.proj(dv)),
                head=lambda x: model.head(model.norm(x)))


def _hf_native(model):
    core = model.vision_model

    def run(layer, x):
        out = layer(x, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def qkv(layer, h):
        a = layer.self_attn
        return tuple(_heads(p(h), a.num_heads) for p in (a.q_proj, a.k_proj, a.v_proj))

    return dict(embed=lambda x: core.pre_layrnorm(core.embeddings(x)), blocks=list(core.encoder.layers),
                run=run, qkv=qkv, ln_1=lambda b: b.layer_norm1,
                dv_out=lambda b, dv: b.self_attn.out_proj(dv),
                head=lambda x: model.visual_projection(core.post_layernorm(x)))


NATIVE = {"open_clip": _open_clip_native, "timm": _timm_native, "hf": _hf_native}


def float64_loop(kind, visual, images, dual_layers, aal_layers, second_path="dv"):
    v = copy.deepcopy(visual).double()
    native = NATIVE[kind](v)
    x = native["embed"](images.double())
    blocks = native["blocks"]
    x_dv, rows = None, []
    for i, block in enumerate(blocks):
        q, k, val = native["qkv"](block, native["ln_1"](block)(x))
        scale = q.shape[-1] ** -0.5
        if i >= len(blocks) - dual_layers:
            x_dv = x if x_dv is None else x_dv
            second = ref.merge_heads(val) if second_path == "dv" else \
                ref.dual_attention(val, val, val, rows=0, scale=scale)[0]     # softmax(s v vᵀ) v
            x_dv = x_dv + native["dv_out"](block, second)
        if i in aal_layers:
            rows.append(ref.dual_attention(q, k, val, rows=1, scale=scale)[2][:, :, 0])
        x = native["run"](block, x)
    return native["head"](x), native["head"](x_dv), torch.stack(rows)


TOWERS = {
    "open_clip MHA": ("open_clip", lambda: open_clip_vit()),
    "open_clip MHA layer scale": ("open_clip", lambda: open_clip_vit(ls_init_value=0.1)),
    "open_clip main Attention": ("open_clip", lambda: open_clip_main_vit()),
    "open_clip main Attention QK-norm": ("open_clip", lambda: open_clip_main_vit(qk_norm=True)),
    "timm": ("timm", lambda: timm_vit()),
    "timm QK-norm": ("timm", lambda: timm_vit(qk_norm=True)),
    "transformers CLIP": ("hf", hf_clip),
    "ViT-g-14-like, head dim 88": ("open_clip", lambda: open_clip_vit(width=176, layers=3)),
    "ViT-bigG-14-like, head dim 104": ("open_clip", lambda: open_clip_vit(width=208, layers=3)),
}


@pytest.mark.parametrize("mode", ["split", "stacked"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_dual_path_matches_float64_loop_over_the_towers_own_blocks(name, mode):
    kind, make = TOWERS[name]
    visual = make()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 2), out_proj_mode=mode)
    assert model.tower.kind == kind
    images = torch.randn(2, 3, 32, 32, generator=gen(1))
    out = model(images)
    tokens, tokens_dv, cls = float64_loop(kind, visual, images, 2, (0, 2))
    torch.testing.assert_close(out.tokens.double(), tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tokens_dv.double(), tokens_dv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attn.double(), cls, rtol=1e-5, atol=1e-6)
    assert out.cls_attn.shape == (2, 2, 2, 17) and out.cls_attn.dtype == torch.float32


@pytest.mark.parametrize("name", list(TOWERS))
def test_align_off_equals_the_towers_own_forward(name):
    _, make = TOWERS[name]
    visual = make()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0,))
    images = torch.randn(2, 3, 32, 32, generator=gen(2))
    with torch.no_grad():
        want = model.tower.forward(images)
        got = model.encode_image(images, normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["open_clip MHA", "timm"])
def test_the_vvv_second_path_matches_a_float64_loop_in_values_and_gradients(name):
    kind, make = TOWERS[name]
    visual = make()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 2), second_path="vvv")
    images = torch.randn(2, 3, 32, 32, generator=gen(4))
    ours_in, ref_in = images.clone().requires_grad_(), images.double().requires_grad_()
    out = model(ours_in)
    want = float64_loop(kind, visual, ref_in, 2, (0, 2), second_path="vvv")
    ups = [torch.randn(t.shape, generator=gen(5 + i), dtype=torch.float64) for i, t in enumerate(want)]
    for got, expected in zip(out, want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got_grad = torch.autograd.grad(list(out), ours_in, [u.float() for u in ups])[0]
    want_grad = torch.autograd.grad(list(want), ref_in, ups)[0]
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-5)
    dv_model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 2))
    assert not torch.allclose(dv_model(images).tokens_dv, out.tokens_dv)
    with pytest.raises(ValueError, match="second_path must be one of dv, vvv"):
        AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0,), second_path="qkv")


def test_vit_b32_dual_path_matches_float64_loop():
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    model = AlignCLIPVisual(visual)        # the authors' defaults: 6 dual blocks, AAL on 0..4
    images = torch.randn(1, 3, 224, 224, generator=gen(2))
    with torch.no_grad():
        out = model(images)
    tokens, tokens_dv, cls = float64_loop("open_clip", visual, images, 6, (0, 1, 2, 3, 4))
    torch.testing.assert_close(out.tokens.double(), tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.tokens_dv.double(), tokens_dv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cls_attn.double(), cls, rtol=1e-4, atol=1e-6)


def test_wraps_without_copying_weights():
    visual = open_clip_vit()
    model = AlignCLIPVisual(visual, dual_layers=2, aal_layers=(0, 1))
    assert model.visual is visual
    assert {id(p) for p in model.parameters()} == {id(p) for p in visual.parameters()}


@pytest.mark.parametrize("name", ["open_clip MHA", "timm", "transformers CLIP"])
def test_gradients_reach_every_parameter_through_the_loss(name):
    _, make = TOWERS[name]
    model = AlignCLIPVisual(make(), dual_layers=2, aal_layers=(0, 1))
    loss = AlignCLIPLoss(F.normalize(torch.randn(3, 32), dim=-1))
    terms = loss(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    assert all(torch.isfinite(t) for t in terms[:4])
    terms.total.backward()
    unused = ("visual_projection",) if name == "transformers CLIP" else ()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(unused)]
    assert not missing, missing


REFUSED = [
    (lambda: open_clip_main_vit(scaled_cosine=True), "block 0: scaled-cosine attention"),
    (lambda: open_clip_main_vit(scale_heads=True), "block 0: per-head scale"),
    (lambda: open_clip_main_vit(inner_norm=True), "block 0: the inner norm"),
]


@pytest.mark.parametrize("make,match", REFUSED)
def test_variants_the_fused_op_cannot_express_are_refused_by_block_and_feature(make, match):
    with pytest.raises(TowerError, match=match):
        AlignCLIPVisual(make())


def test_a_head_dim_the_kernels_cannot_take_is_refused_when_built_naming_model_and_block():
    with pytest.raises(TowerError, match=r"VisionTransformer block 0 \(1 heads of width 100\): head dim D "
                                         r"must be a multiple of 8 from 8 to 256.*got 100"):
        AlignCLIPVisual(open_clip_vit(width=100, heads=1, layers=2), dual_layers=1, aal_layers=(0,))


def test_towers_whose_output_is_not_clips_image_embedding_are_refused_in_one_line():
    timm = pytest.importorskip("timm")
    classifier = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32, patch_size=16,
                                   depth=1)   # the architecture's default tag: a 1000-class classifier
    with pytest.raises(TowerError, match=r"laion2b_ft_in12k_in1k ends in a 1000-class classifier head") as info:
        AlignCLIPVisual(classifier)
    assert len(str(info.value).splitlines()) == 1
    AlignCLIPVisual(timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, img_size=32, depth=2),
                    dual_layers=1, aal_layers=(0,))
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    with pytest.raises(TowerError, match="CLIPVisionModel has no visual projection.*CLIPVisionModelWithProjection"):
        AlignCLIPVisual(transformers.CLIPVisionModel(config))


def test_refuses_non_vit_towers_and_bad_layers():
    with pytest.raises(TypeError, match="ViT image tower"):
        AlignCLIPVisual(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dual_layers"):
        AlignCLIPVisual(open_clip_vit(), dual_layers=9)
    with pytest.raises(ValueError, match="aal_layers"):
        AlignCLIPVisual(open_clip_vit(), dual_layers=2, aal_layers=(0, 7))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(text="features"), TypeError, "text must be a torch.Tensor"),
    (dict(text=torch.randn(5)), ValueError, r"text must have shape \[K, E\]"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite and > 0"),
    (dict(alpha="0.3"), TypeError, "alpha must be a real number"),
    (dict(aloss=float("inf")), ValueError, "aloss must be finite"),
    (dict(sls="false"), TypeError, "sls must be True or False, got str 'false'"),
    (dict(align=0), TypeError, "align must be True or False, got int 0"),
])
def test_loss_refuses_bad_arguments_by_name(kwargs, error, match):
    args = dict(text=torch.randn(4, 8)) | kwargs
    with pytest.raises(error, match=match):
        AlignCLIPLoss(args.pop("text"), **args)


def test_hf_attention_implementation_equals_eager():
    transformers = pytest.importorskip("transformers")
    import alignclip.hf

    name = alignclip.hf.register()
    model = hf_clip()
    images = torch.randn(2, 3, 32, 32, generator=gen(3))
    with torch.no_grad():
        eager = model(pixel_values=images).image_embeds
        model.set_attn_implementation(name)
        fused = model(pixel_values=images).image_embeds
    assert model.config._attn_implementation == name
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert transformers.AttentionInterface is not None
