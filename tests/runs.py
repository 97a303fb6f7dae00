"""A tiny training configuration for tests: synthetic data, the tiny ViT, a handful of steps."""
import copy

from alignclip.config import load_config

TINY = {
    "task": "domain_shift",
    "data": {"dataset": "Synthetic", "targets": [3], "batch_size": 4, "num_workers": 0,
             "synthetic": {"domains": 4, "classes": 3, "per_class": 10, "image_size": 32}},
    "model": {"arch": "AlignCLIP-Tiny", "pretrained": None, "dual_layers": 2, "aal_layers": [0, 1]},
    "train": {"epochs": 1, "iters_per_epoch": 6, "lr": 1e-3, "log_every": 1, "checkpoint_every": 3,
              "eval_batch_size": 64, "device": "cpu", "attention_images": 2},
}


def tiny_config(root, **sections):
    cfg = load_config()
    for key, value in copy.deepcopy(TINY).items():
        if isinstance(value, dict):
            for k, v in value.items():
                cfg[key][k] = copy.deepcopy(v) if not isinstance(v, dict) else {**cfg[key][k], **v}
        else:
            cfg[key] = value
    cfg["data"]["root"] = str(root)
    for key, value in sections.items():
        cfg[key].update(value)
    return cfg
