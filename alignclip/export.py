"""Export a run's image tower into a plain open_clip checkpoint of the whole CLIP.

    python -m alignclip export --checkpoint RUN/checkpoints/last.pt --weights bma --out clip.pt
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained="clip.pt")

The text tower (and logit scale) comes from the run's pretrained tag, or from the checkpoint when
the run started from random weights; the image tower is the run's last, BMA or best one.
"""
import os

import open_clip

from .checkpoint import RunError, load, load_weights, save_atomic
from .clip import build_architecture, build_clip, quick_gelu, register_model_configs
from .config import from_dict

WEIGHTS = ("last", "bma", "best")


def loadable_arch(model_cfg):
    """The open_clip model name that rebuilds the run's activation (a -quickgelu twin for
    OpenAI's weights, whose tag is not part of a plain checkpoint file)."""
    twin = f"{model_cfg.arch}-quickgelu"
    return twin if quick_gelu(model_cfg) and twin in open_clip.list_models() else model_cfg.arch


def export(checkpoint, weights, out):
    """Write the CLIP state dict with the chosen image tower to `out`; returns the arch name."""
    if weights not in WEIGHTS:
        raise RunError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    state = load(checkpoint)
    cfg = from_dict(state["config"])
    if state.get("text_tower") is not None:
        clip = build_architecture(cfg.model)
        load_weights(clip, {**state["text_tower"], **{f"visual.{k}": v for k, v in state["visual"].items()}},
                     checkpoint, "CLIP")
    else:
        clip, _ = build_clip(cfg.model, "cpu")
    if weights == "last":
        tower = state["visual"]
    elif weights == "bma":
        tower = state["bma"]["module"]
    else:
        best_path = os.path.join(os.path.dirname(checkpoint), "best.pt")
        if not os.path.exists(best_path):
            raise RunError(f"--weights best: {best_path} does not exist (the run kept no best epoch; "
                           "train.select_best must be on)")
        tower = load(best_path, required=("visual",))["visual"]
    load_weights(clip.visual, tower, checkpoint, weights)
    save_atomic(clip.state_dict(), out)
    register_model_configs()
    return loadable_arch(cfg.model)
