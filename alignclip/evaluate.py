"""Evaluation: top-1 accuracy of image towers on a task's evaluation sets, and of a saved run's
last, BMA and best towers (`python -m alignclip eval`), with nothing but the checkpoint and
the data: no optimizer, no BMA update, no data set written, no text encoder run."""
import copy
import os
import warnings

import torch

from .checkpoint import RunError, load, load_weights
from .clip import build_architecture
from .config import from_dict
from .data import SampleDataset, build_task, eval_transform
from .data.samples import CorruptImageError
from .model import AlignCLIPVisual


def transforms_kind(cfg, task):
    """The transforms a run uses: the config's choice, or the authors' for the data (auto)."""
    return task.transforms if cfg.data.transforms == "auto" else cfg.data.transforms


def image_size(visual):
    size = getattr(visual, "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


@torch.no_grad()
def accuracy(visual, eval_set, text, cfg, task, size, device):
    """Top-1 accuracy (%) of `visual`'s normalised CLS features against `text` [K, E]; None,
    with a warning, for an empty evaluation set."""
    if not eval_set.samples:
        warnings.warn("an evaluation set is empty: its accuracy is reported as null", stacklevel=2)
        return None
    encoder = AlignCLIPVisual(visual, dual_layers=0, aal_layers=())
    loader = torch.utils.data.DataLoader(
        SampleDataset(eval_set.samples, eval_transform(transforms_kind(cfg, task), size),
                      cfg.data.skip_corrupt),
        batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers)
    correct = 0
    for images, labels in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = encoder.encode_image(images.to(device)).float()
        correct += int(((feats @ text.T).argmax(1).cpu() == labels).sum())
    return 100.0 * correct / len(eval_set.samples)


def evaluate_towers(towers, task, text, cfg, size, device):
    """{tower name: {eval set name: accuracy}}."""
    return {tag: {name: accuracy(tower, es, text[name], cfg, task, size, device)
                  for name, es in task.eval_sets.items()} for tag, tower in towers.items()}


def evaluate_checkpoint(checkpoint, cfg=None):
    """Accuracies of a run checkpoint's last, BMA and (when saved) best towers. The
    configuration is the checkpoint's unless `cfg` is given; the data is read from cfg.data.root
    (the synthetic demo set must already exist: evaluation writes nothing but eval.json)."""
    try:
        return _evaluate_checkpoint(checkpoint, cfg)
    except CorruptImageError as exc:
        raise RunError(CorruptImageError.one_line(exc)) from None


def _evaluate_checkpoint(checkpoint, cfg):
    state = load(checkpoint)
    cfg = cfg or from_dict(state["config"])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    data = cfg.data
    if data.dataset == "Synthetic" and data.root is None:
        root = os.path.join(cfg.output_dir, "data")
        if not os.path.isdir(root):
            raise RunError(f"the synthetic data of this run ({root}) is gone; set data.root")
        cfg = copy.deepcopy(cfg)
        cfg.data.root = root
    task = build_task(cfg.data, cfg.task, cfg.seed)
    if list(state["classnames"]["train"]) != list(task.classnames):
        raise RunError(f"checkpoint {checkpoint} was trained on other classes than {cfg.data.dataset} "
                       f"at {cfg.data.root} holds")
    visual = build_architecture(cfg.model, device).visual
    load_weights(visual, state["visual"], checkpoint, "image tower")
    towers = {"last": visual}
    bma = copy.deepcopy(visual)
    load_weights(bma, state["bma"]["module"], checkpoint, "BMA")
    towers["bma"] = bma
    best_path = os.path.join(os.path.dirname(checkpoint), "best.pt")
    if os.path.exists(best_path):
        best = copy.deepcopy(visual)
        load_weights(best, load(best_path, required=("visual",))["visual"], best_path, "best")
        towers["best"] = best
    text = {name: t.to(device) for name, t in state["text"].items()}
    results = evaluate_towers(towers, task, text, cfg, image_size(visual), device)
    return {"checkpoint": os.path.abspath(checkpoint), "steps": int(state["step"]), **results}
