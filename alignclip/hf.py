"""Hugging Face transformers integration: the fused attention as an attention implementation.

    import alignclip.hf
    alignclip.hf.register()                       # once: registers attn_implementation="alignclip"
    model = CLIPVisionModel.from_pretrained(name, attn_implementation="alignclip")

The vision tower then runs `fused_alignclip_attention` (no D-V branch, no CLS row) in place of
eager or SDPA attention, with the same outputs. For the dual path, wrap the model in
`AlignCLIPVisual` instead: it runs the tower's layers itself.
"""
from alignclip_kernels import fused_alignclip_attention

NAME = "alignclip"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature: q, k, v [B, H, N, D] -> ([B, N, H, D], None)."""
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={NAME!r} runs unmasked attention (CLIP's vision "
                         f"tower); {type(module).__name__} passed an attention mask")
    if dropout and module.training:
        raise ValueError(f"attn_implementation={NAME!r} has no attention dropout; got dropout={dropout}")
    out, _, _ = fused_alignclip_attention(query, key, value, scale=scaling, return_dv=False,
                                          return_cls_attn=False)
    b, h, n, d = query.shape
    return out.view(b, n, h, d), None


def register(name=NAME):
    """Register the fused attention with transformers' `AttentionInterface` under `name`."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    return name
