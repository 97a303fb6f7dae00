"""Class text features from the frozen CLIP text encoder, one prompt per class name."""
import torch
import torch.nn.functional as F


def prompt(classname, template):
    """The template with the class name (underscores as spaces) in its one `{}`."""
    if template.count("{}") != 1:
        raise ValueError(f"a class prompt needs exactly one {{}} for the class name, got {template!r}")
    return template.format(classname.replace("_", " "))


@torch.no_grad()
def class_text_features(clip_model, tokenizer, classnames, template, device=None, batch_size=256):
    """[K, E] fp32, L2-normalised, computed once under no_grad."""
    if not classnames:
        raise ValueError("classnames must name at least one class")
    device = device or next(clip_model.parameters()).device
    feats = []
    for i in range(0, len(classnames), batch_size):
        tokens = tokenizer([prompt(c, template) for c in classnames[i:i + batch_size]]).to(device)
        feats.append(clip_model.encode_text(tokens).float())
    return F.normalize(torch.cat(feats), dim=-1)
