"""Evaluation: top-1 accuracy of image towers on a task's evaluation sets, and of a saved run's
last, BMA and best towers (`python -m alignclip eval`), with nothing but the checkpoint and
the data: no optimizer, no BMA update, no data set written, no text encoder run.

An `Evaluator` keeps one loader per evaluation set for the whole run (persistent workers,
pinned batches) and runs every tower it is given on each batch, so an image is decoded once
for the last, BMA and best towers; accuracies it already knows (the last tower's validation at
the final step, the best tower's) are not computed again. Correct counts stay on the device:
one host read per set, none per batch. Towers run in the training dtype (bf16 autocast on CUDA)
through the fused attention.
"""
import copy
import os
import warnings

import torch

from .checkpoint import RunError, load, load_weights
from .clip import build_architecture
from .config import from_dict, resolved_transforms
from .data import DeviceBatches, build_task, eval_loader, worker_count
from .data.decode import CorruptImageError
from .data.root import data_config
from .model import AlignCLIPVisual


def image_size(visual):
    size = getattr(visual, "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


class Evaluator:
    """Accuracies (%) of towers on `task.eval_sets`, each text [K, E] in `text[name]`."""

    def __init__(self, task, text, cfg, size, device):
        self.task, self.text, self.cfg, self.size, self.device = task, text, cfg, size, device
        self.kind = resolved_transforms(cfg)
        self.workers = worker_count(cfg.data.num_workers)
        self.loaders = {}
        self.by_domain = {}    # (tower, set): {domain: accuracy} for sets over several domains

    def _batches(self, name):
        if name not in self.loaders:
            self.loaders[name] = eval_loader(self.task.eval_sets[name].samples, self.kind, self.size,
                                             batch_size=self.cfg.train.eval_batch_size, workers=self.workers,
                                             device=self.device, skip_corrupt=self.cfg.data.skip_corrupt)
        return DeviceBatches(self.loaders[name], self.kind, self.size, self.device)

    @torch.no_grad()
    def accuracies(self, towers, name):
        """{tower name: accuracy on set `name`}; None, with a warning, for an empty set."""
        samples = self.task.eval_sets[name].samples
        if not samples:
            warnings.warn(f"evaluation set {name} is empty: its accuracy is reported as null", stacklevel=2)
            return {tag: None for tag in towers}
        encoders = {tag: AlignCLIPVisual(t, dual_layers=0, aal_layers=()) for tag, t in towers.items()}
        right = torch.zeros(len(towers), len(samples), dtype=torch.bool, device=self.device)
        text, seen = self.text[name], 0
        for images, labels in self._batches(name):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                for k, encoder in enumerate(encoders.values()):
                    feats = encoder.encode_image(images).float()
                    right[k, seen:seen + len(labels)] = (feats @ text.T).argmax(1) == labels
            seen += len(labels)
        domains = self.task.eval_sets[name].domains
        counts = [n for _, n in domains] if len(domains) > 1 else [len(samples)]
        correct = torch.stack([part.sum(1) for part in right.split(counts, dim=1)], dim=1).tolist()
        for tag, per_part in zip(towers, correct):
            if len(domains) > 1:
                self.by_domain[(tag, name)] = {d: 100.0 * c / n if n else None
                                               for (d, n), c in zip(domains, per_part)}
        return {tag: 100.0 * sum(c) / len(samples) for tag, c in zip(towers, correct)}

    def evaluate(self, towers, known=None, sets=None):
        """{tower: {set: accuracy}} over `sets` (every set by default); `known` {(tower, set):
        accuracy} is reused. A set over several target domains also gets `<set>_domains`
        {domain: accuracy} and `<set>_mean`, their unweighted mean (the pooled accuracy
        weights domains by their image counts)."""
        known = known or {}
        results = {tag: {} for tag in towers}
        for name in sets or self.task.eval_sets:
            todo = {tag: t for tag, t in towers.items() if (tag, name) not in known}
            found = self.accuracies(todo, name) if todo else {}
            for tag in towers:
                results[tag][name] = known[(tag, name)] if (tag, name) in known else found[tag]
                per_domain = self.by_domain.get((tag, name))
                if per_domain:
                    results[tag][f"{name}_domains"] = per_domain
                    values = [v for v in per_domain.values() if v is not None]
                    results[tag][f"{name}_mean"] = sum(values) / len(values) if values else None
        return results

    def test_domains(self):
        """{set: [{"domain", "images"}]} of the sets that are scored on target domains."""
        return {name: [{"domain": d, "images": n} for d, n in s.domains]
                for name, s in self.task.eval_sets.items() if s.domains and name != "val"}


def zero_shot(cfg):
    """Accuracies of the configuration's CLIP before any training (zero-shot, the first row of
    every table in this field) on the task's scored sets, written to OUTPUT_DIR/summary.json
    (steps 0) beside config.yaml, so a sweep reads it like a run."""
    from .clip import build_clip
    from .distributed import Dist, resolve_device
    from .run import RunFolder, provenance
    from .text import class_text_features

    ddp = Dist()
    device = resolve_device(cfg.train.device, ddp)
    torch.manual_seed(cfg.seed)   # a randomly initialised model: the one a run of this seed starts from
    task = build_task(data_config(cfg, ddp), cfg.task, cfg.seed)
    clip, tokenizer = build_clip(cfg.model, device)
    template = cfg.model.template or task.template
    sets = [name for name in task.eval_sets if name != "val"]
    text = {name: class_text_features(clip, tokenizer, task.eval_sets[name].classnames, template, device)
            for name in sets}
    evaluator = Evaluator(task, text, cfg, image_size(clip.visual), device)
    results = evaluator.evaluate({"zero_shot": clip.visual}, sets=sets)
    summary = {"steps": 0, "num_classes": len(task.classnames), "test_domains": evaluator.test_domains(),
               **provenance(cfg), **results}
    folder = RunFolder(cfg.output_dir)
    os.makedirs(folder.path, exist_ok=True)
    with open(folder.config, "w") as f:
        f.write(cfg.to_yaml())
    folder.write_json(folder.summary, summary)
    return summary


def evaluate_checkpoint(checkpoint, cfg=None, overrides=()):
    """Accuracies of a run checkpoint's last, BMA and (when saved) best towers. The
    configuration is the checkpoint's (with `overrides` applied) unless `cfg` is given; the data
    is read from cfg.data.root (the synthetic demo set must already exist: evaluation writes
    nothing but eval.json)."""
    try:
        return _evaluate_checkpoint(checkpoint, cfg, overrides)
    except CorruptImageError as exc:
        raise RunError(CorruptImageError.one_line(exc)) from None


def _evaluate_checkpoint(checkpoint, cfg, overrides):
    state = load(checkpoint)
    cfg = cfg or from_dict(state["config"], overrides)
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
    evaluator = Evaluator(task, text, cfg, image_size(visual), device)
    results = evaluator.evaluate(towers)
    return {"checkpoint": os.path.abspath(checkpoint), "steps": int(state["step"]),
            "test_domains": evaluator.test_domains(), **results}
