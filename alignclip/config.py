"""Run configuration: YAML over the authors' defaults (SPEC.md section 8), validated.

Unknown keys and wrong types are errors that list what is allowed. `--set a.b=value` parses
`value` as YAML (numbers, booleans, lists, null).
"""
import copy

import yaml

NUMBER = (int, float)
# key: (allowed types, default); None among the types means the key may be null.
SCHEMA = {
    "task": ((str,), "domain_shift"),
    "seed": ((int,), 0),
    "output_dir": ((str,), "runs/alignclip"),
    "data": {
        "root": ((str, None), None),
        "dataset": ((str,), "PACS"),
        "targets": ((list,), [0]),
        "batch_size": ((int,), 36),
        "holdout_fraction": (NUMBER, 0.2),
        "num_workers": ((int,), 4),
        "skip_corrupt": ((bool,), False),
        "shots": ((int, None), None),
        "split_file": ((str, None), None),
        "synthetic": {
            "domains": ((int,), 4),
            "classes": ((int,), 4),
            "per_class": ((int,), 40),
            "image_size": ((int,), 32),
        },
    },
    "model": {
        "arch": ((str,), "ViT-B-16"),
        "pretrained": ((str, None), "openai"),
        "dual_layers": ((int,), 6),
        "aal_layers": ((list,), [0, 1, 2, 3, 4]),
        "out_proj_mode": ((str,), "split"),
        "template": ((str,), "a photo of a {}."),
    },
    "train": {
        "epochs": ((int,), 10),
        "iters_per_epoch": ((int,), 500),
        "epochs_per_dataset": ((dict,), {}),
        "lr": (NUMBER, 5e-6),
        "weight_decay": (NUMBER, 0.1),
        "bma_beta": (NUMBER, 0.5),
        "device": ((str,), "auto"),
        "log_every": ((int,), 10),
        "checkpoint_every": ((int,), 500),
        "eval_batch_size": ((int,), 128),
        "attention_images": ((int,), 4),
    },
    "loss": {
        "align": ((bool,), True),
        "alpha": (NUMBER, 0.3),
        "logit_scale": (NUMBER, 100.0),
        "epsilon": (NUMBER, 0.9),
        "smoothing": (NUMBER, 35.0),
        "aloss": (NUMBER, 10.0),
        "temperature": (NUMBER, 1.0),
    },
}
TASKS = ("domain_shift", "open_class", "in_the_wild")


class ConfigError(ValueError):
    pass


def defaults(schema=SCHEMA):
    return {k: defaults(v) if isinstance(v, dict) and not isinstance(v, tuple) else copy.deepcopy(v[1])
            for k, v in schema.items()}


def _type_names(types):
    return " or ".join("null" if t is None else ("number" if t is NUMBER else t.__name__)
                       for t in types)


def _check_value(key, value, types):
    flat = []
    for t in types:
        flat += list(t) if isinstance(t, tuple) else [t]
    if value is None:
        if None in flat:
            return
    elif any(t is not None and isinstance(value, t) and not (isinstance(value, bool) and t is not bool)
             for t in flat):
        return
    raise ConfigError(f"config key {key} must be {_type_names(types)}, got {value!r}")


def _merge(base, update, schema, prefix=""):
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {path}; allowed here: {', '.join(sorted(schema))}")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path} must be a mapping with keys {', '.join(sorted(spec))}")
            _merge(base[key], value, spec, path + ".")
        else:
            _check_value(path, value, spec[0])
            base[key] = float(value) if spec[0] is NUMBER else value


def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):   # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def validate(cfg):
    if cfg["task"] not in TASKS:
        raise ConfigError(f"config key task must be one of {TASKS}, got {cfg['task']!r}")
    for key in ("batch_size", "num_workers"):
        if cfg["data"][key] < (1 if key == "batch_size" else 0):
            raise ConfigError(f"config key data.{key} out of range: {cfg['data'][key]}")
    for key in ("epochs", "iters_per_epoch", "log_every", "checkpoint_every", "eval_batch_size"):
        if cfg["train"][key] < 1:
            raise ConfigError(f"config key train.{key} must be >= 1, got {cfg['train'][key]}")
    if not 0 < cfg["data"]["holdout_fraction"] < 1:
        raise ConfigError("config key data.holdout_fraction must be in (0, 1)")
    if not all(isinstance(t, int) for t in cfg["data"]["targets"]):
        raise ConfigError(f"config key data.targets must be a list of domain indices, got {cfg['data']['targets']}")
    for key in ("lr", "logit_scale", "smoothing", "temperature", "bma_beta"):
        section = "train" if key in ("lr", "bma_beta") else "loss"
        if cfg[section][key] <= 0:
            raise ConfigError(f"config key {section}.{key} must be > 0, got {cfg[section][key]}")
    return cfg


def load_config(path=None, overrides=()):
    cfg = defaults()
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
        _merge(cfg, raw, SCHEMA)
    for text in overrides:
        _merge(cfg, parse_override(text), SCHEMA)
    return validate(cfg)


def total_steps(cfg):
    epochs = cfg["train"]["epochs_per_dataset"].get(cfg["data"]["dataset"], cfg["train"]["epochs"])
    return int(epochs) * cfg["train"]["iters_per_epoch"]
