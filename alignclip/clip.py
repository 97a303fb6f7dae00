"""Building the CLIP model a run fine-tunes: open_clip's model with the right activation, a
one-line answer when its pretrained weights cannot be had, and the model's own logit scale."""
import contextlib
import logging
import os
import socket

import open_clip
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from .checkpoint import RunError

MODEL_CONFIGS = os.path.join(os.path.dirname(__file__), "model_configs")


def register_model_configs():
    """Make the package's own model configs (the demo's AlignCLIP-Tiny) known to open_clip."""
    if "AlignCLIP-Tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)


def _hub_reachable(host="huggingface.co", timeout=2.0):
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(tag_cfg):
    """Whether the weights of an open_clip pretrained tag are already in the local caches."""
    from huggingface_hub import try_to_load_from_cache

    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)       # "org/name/" names the repo's default file
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
            return True
    url = tag_cfg.get("url", "")
    cache = os.path.expanduser(os.environ.get("OPEN_CLIP_CACHE", "~/.cache/clip"))
    return bool(url) and os.path.isfile(os.path.join(cache, os.path.basename(url)))


def _check_layers(model_cfg):
    """The configured blocks and the head dimension against the architecture's own config."""
    from alignclip_kernels.attention import kernel_head_dim_problem

    arch = model_cfg.arch
    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    depth = vision.get("layers")
    if not isinstance(depth, int):
        raise RunError(f"model.arch {arch} has no ViT image tower (ResNet towers have no CLS attention)")
    if model_cfg.dual_layers > depth:
        raise RunError(f"model.dual_layers {model_cfg.dual_layers} exceeds the {depth} blocks of {arch}")
    bad = [i for i in model_cfg.aal_layers if i >= depth]
    if bad:
        raise RunError(f"model.aal_layers {bad} out of range: {arch} has blocks 0..{depth - 1}")
    problem = kernel_head_dim_problem(vision.get("head_width", 64))
    if problem:
        raise RunError(f"{arch}: {problem}")


def check_model(model_cfg):
    """Refuse an unknown architecture or pretrained tag, or layers it does not have, in one
    line before any work; also weights that are neither cached nor downloadable (offline),
    instead of a minute of retries."""
    register_model_configs()
    arch, tag = model_cfg.arch, model_cfg.pretrained
    if arch not in open_clip.list_models():
        raise RunError(f"model.arch {arch!r} is not an open_clip model; e.g. ViT-B-16, ViT-B-32, "
                       f"ViT-L-14, ViT-H-14, AlignCLIP-Tiny")
    _check_layers(model_cfg)
    if tag is None or os.path.isfile(tag):
        return {}
    tag_cfg = get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        known = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
        raise RunError(f"model.pretrained {tag!r} is neither a file nor a pretrained tag of {arch} "
                       f"(known: {known})")
    if not _cached(tag_cfg) and (os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()):
        raise RunError(f"model.pretrained {tag!r}: the {arch} weights are not in the local cache and "
                       "the hub cannot be reached (offline); download them once online, or set "
                       "model.pretrained to a weights file")
    return tag_cfg


def quick_gelu(model_cfg):
    """Whether the run's pretrained tag was trained with QuickGELU (read from open_clip's tag
    metadata: no download)."""
    tag = model_cfg.pretrained
    if not tag or os.path.isfile(tag):
        return False
    return bool(get_pretrained_cfg(model_cfg.arch, tag).get("quick_gelu", False))


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns on every model built without weights, also where that is intended (the
    package's test model, an architecture a checkpoint fills); `random_init_notice` says it once,
    in plain words, where it is likely a mistake."""

    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning():
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def random_init_notice(model_cfg):
    """A line when a run asks for no weights for an architecture that has CLIP weights (likely
    a mistake: the run will not start from CLIP), else None."""
    if model_cfg.pretrained is not None:
        return None
    tags = list_pretrained_tags_by_model(model_cfg.arch)
    if not tags:
        return None
    return (f"note: model.pretrained is null, so {model_cfg.arch} starts from random weights, not from CLIP; "
            f"set model.pretrained to one of {', '.join(tags[:4])}{', ...' if len(tags) > 4 else ''} to fine-tune CLIP")


def build_clip(model_cfg, device):
    """(CLIP with only its image tower trainable, tokenizer).

    OpenAI's weights were trained with QuickGELU; open_clip builds e.g. ViT-B-16 with GELU and
    only warns on the mismatch, so the activation is taken from the pretrained tag itself.
    """
    check_model(model_cfg)
    with _without_random_init_warning():
        clip = open_clip.create_model(model_cfg.arch, pretrained=model_cfg.pretrained, device=device,
                                      force_quick_gelu=quick_gelu(model_cfg))
    clip.eval().requires_grad_(False)
    clip.visual.requires_grad_(True)
    return clip, open_clip.get_tokenizer(model_cfg.arch)


def build_architecture(model_cfg, device="cpu"):
    """The same CLIP without any weights loaded (a checkpoint supplies them): the activation
    still follows the pretrained tag's metadata, which needs no download."""
    register_model_configs()
    with _without_random_init_warning():
        return open_clip.create_model(model_cfg.arch, pretrained=None, device=device,
                                      force_quick_gelu=quick_gelu(model_cfg))


def logit_scale(clip):
    """exp(logit_scale) of the loaded CLIP (100 for OpenAI's weights), as the authors read it."""
    return float(clip.logit_scale.detach().exp())
