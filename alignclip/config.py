"""Run configuration: typed dataclasses whose defaults are the authors' settings (their `main.py`
and `scripts/*.sh`), YAML files over them, and `--set section.key=value` overrides.

A YAML file may also hold `per_dataset: {Name: {section: {key: value}}}` and
`per_target: {index: {...}}`: settings that apply only when `data.dataset` is that data set or
`data.targets` is that single target (e.g. the open-class epochs per data set, or the
in-the-wild DomainNet epochs per target). `python -m alignclip config --config FILE` prints what
resolves. Unknown keys, wrong types and out-of-range values are one-line `ConfigError`s.
"""
import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from alignclip_kernels.paper import ALIGN_WEIGHT, LABEL_EPSILON, MARGIN_ALPHA, SMOOTHING, TEMPERATURE

TASKS = ("domain_shift", "open_class", "in_the_wild", "imagenet_shift")
COOP_TASKS = ("open_class", "imagenet_shift")   # CoOp's data sets
TRANSFORMS = ("auto", "alignclip", "domainbed", "coop")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOGGERS = ("none", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key."""


@dataclass
class SyntheticConfig:
    domains: int = 4           # styles (the demo's domains)
    classes: int = 4           # shapes
    per_class: int = 40        # images per (domain, class)
    image_size: int = 32


@dataclass
class DataConfig:
    root: Optional[str] = None            # folder holding the data set (DomainBed or CoOp layout)
    dataset: str = "PACS"                 # a DomainBed or CoOp data set name, or Synthetic
    targets: List[int] = field(default_factory=lambda: [0])   # target domains (sorted domain order)
    batch_size: int = 36                  # per source domain a step (open class: a step)
    holdout_fraction: float = 0.2         # DomainBed's validation split of every domain
    split_seed: int = 0                   # DomainBed's trial seed: the 80/20 split of each domain
    num_workers: Optional[int] = None     # data workers for the run (null: this machine's cores, less one)
    skip_corrupt: bool = False            # skip unreadable images (with a warning) instead of stopping
    shots: Optional[int] = None           # few-shot training on CoOp data: images per class
    split_file: Optional[str] = None      # a CoOp split file other than the data set's own
    transforms: str = "auto"              # alignclip | domainbed | coop | auto (alignclip for DomainBed
                                          # data, coop for CoOp data: the authors' choices)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: str = "ViT-B-16"                # an open_clip model name
    pretrained: Optional[str] = "openai"  # an open_clip pretrained tag or a file; null: random init
    dual_layers: int = 6                  # the last blocks that also carry the D-V path
    aal_layers: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])   # CLS rows for the AAL
    out_proj_mode: str = "split"          # split (two GEMMs) | stacked (one GEMM over both paths)
    second_path: str = "dv"               # dv (AlignCLIP's D-V) | vvv (CLIP Surgery's V-V-V, an ablation)
    template: Optional[str] = None        # class prompt with one {}; null: the data set's own
    grad_checkpointing: bool = False      # recompute each block in backward (or the tower's own flag)


@dataclass
class TrainConfig:
    epochs: int = 10
    iters_per_epoch: int = 500
    lr: float = 5e-6                      # AdamW, cosine schedule over all steps (after any warmup)
    warmup_steps: int = 0                 # linear warmup steps before the cosine (0: the authors')
    weight_decay: float = 0.1
    grad_clip: Optional[float] = None     # clip the gradient's global L2 norm to this (null: no clipping)
    accumulate: int = 1                   # micro-batches a step (same effective batch, less activation memory)
    precision: str = "auto"               # auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp16 (loss scaler) | fp32
    deterministic: bool = False           # bitwise-repeatable steps: torch.use_deterministic_algorithms(True)
    bma_beta: float = 0.5                 # CLIPood's beta moving average
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    compile: bool = False                 # torch.compile the model and loss
    log_every: int = 10
    checkpoint_every: int = 500           # steps between checkpoints (written in the background)
    checkpoint_minutes: Optional[float] = None   # also a checkpoint whenever this many minutes passed
    eval_batch_size: int = 128
    select_best: bool = True              # evaluate the source domains' validation split each epoch
    attention_images: int = 4             # images in attention.png (0: no figure)
    logger: str = "none"                  # none | tensorboard | wandb (extras of the same names) beside metrics.jsonl
    wandb_project: str = "alignclip"      # the Weights & Biases project of train.logger wandb


@dataclass
class LossConfig:
    align: bool = True                    # false: no AAL, no similarity alignment (and no second path)
    sls: bool = True                      # false: hard labels (no semantic smoothing); both false: CLIPood
    alpha: float = MARGIN_ALPHA
    logit_scale: Optional[float] = None   # null: exp(logit_scale) of the loaded CLIP, as the authors
    epsilon: float = LABEL_EPSILON
    smoothing: float = SMOOTHING
    aloss: float = ALIGN_WEIGHT
    temperature: float = TEMPERATURE


@dataclass
class RunConfig:
    task: str = "domain_shift"            # domain_shift | open_class | in_the_wild | imagenet_shift
    seed: int = 0
    output_dir: str = "runs/alignclip"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def total_steps(self):
        return self.train.epochs * self.train.iters_per_epoch

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _type_name(tp):
    if get_origin(tp) is Union:
        return " or ".join("null" if t is type(None) else _type_name(t) for t in get_args(tp))
    if get_origin(tp) in (list, List):
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key, value, tp):
    """`value` as type `tp`, or a ConfigError naming `key`."""
    if get_origin(tp) is Union:
        if value is None and type(None) in get_args(tp):
            return None
        for option in get_args(tp):
            if option is not type(None):
                try:
                    return _coerce(key, value, option)
                except ConfigError:
                    pass
        raise ConfigError(f"config key {key} must be {_type_name(tp)}, got {value!r}")
    if get_origin(tp) in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(key, v, get_args(tp)[0]) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool):
        return value
    raise ConfigError(f"config key {key} must be {_type_name(tp)}, got {value!r}")


def _merge(obj, update, prefix=""):
    if not isinstance(update, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {update!r}")
    hints = get_type_hints(type(obj))
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key {path}; allowed here: {', '.join(sorted(hints))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path + ".")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def parse_override(text):
    """`section.key=value` (value read as YAML) as a nested mapping."""
    if "=" not in text:
        raise ConfigError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot read {raw!r} as a value") from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _check_range(name, value, ok, expected):
    if not ok(value):
        raise ConfigError(f"config key {name} must be {expected}, got {value!r}")


def resolved_transforms(cfg):
    """`data.transforms`, with auto resolved to the authors' choice for the task's data: their
    preprocessing (alignclip) for DomainBed data, CoOp's (coop) for CoOp's data sets (open
    class, ImageNet)."""
    if cfg.data.transforms != "auto":
        return cfg.data.transforms
    return "coop" if cfg.task in COOP_TASKS else "alignclip"


def validate(cfg):
    """Every value in range, before any work: one ConfigError naming the first bad key."""
    finite = math.isfinite
    d, m, t, loss = cfg.data, cfg.model, cfg.train, cfg.loss
    _check_range("task", cfg.task, lambda v: v in TASKS, f"one of {', '.join(TASKS)}")
    _check_range("data.transforms", d.transforms, lambda v: v in TRANSFORMS, f"one of {', '.join(TRANSFORMS)}")
    _check_range("model.out_proj_mode", m.out_proj_mode, lambda v: v in ("split", "stacked"), "split or stacked")
    _check_range("model.second_path", m.second_path, lambda v: v in ("dv", "vvv"), "dv or vvv")
    _check_range("train.precision", t.precision, lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
    _check_range("train.logger", t.logger, lambda v: v in LOGGERS, f"one of {', '.join(LOGGERS)}")
    _check_range("train.accumulate", t.accumulate, lambda v: v >= 1, "an integer >= 1")
    _check_range("train.warmup_steps", t.warmup_steps, lambda v: 0 <= v < max(cfg.total_steps, 1),
                 f"an integer in [0, {cfg.total_steps}) (the run's steps)")
    if t.checkpoint_minutes is not None:
        _check_range("train.checkpoint_minutes", t.checkpoint_minutes, lambda v: finite(v) and v > 0,
                     "finite and > 0 or null")
    if t.grad_clip is not None:
        _check_range("train.grad_clip", t.grad_clip, lambda v: finite(v) and v > 0, "finite and > 0 or null")
    for name, value in (("data.batch_size", d.batch_size), ("train.epochs", t.epochs),
                        ("train.iters_per_epoch", t.iters_per_epoch), ("train.log_every", t.log_every),
                        ("train.checkpoint_every", t.checkpoint_every),
                        ("train.eval_batch_size", t.eval_batch_size)):
        _check_range(name, value, lambda v: v >= 1, "an integer >= 1")
    if d.num_workers is not None:
        _check_range("data.num_workers", d.num_workers, lambda v: v >= 0, "an integer >= 0 or null")
    for name, value in (("train.attention_images", t.attention_images),
                        ("model.dual_layers", m.dual_layers), ("data.split_seed", d.split_seed)):
        _check_range(name, value, lambda v: v >= 0, "an integer >= 0")
    if d.shots is not None:
        _check_range("data.shots", d.shots, lambda v: v >= 1, "an integer >= 1 or null")
    _check_range("data.holdout_fraction", d.holdout_fraction, lambda v: finite(v) and 0 < v < 1, "in (0, 1)")
    _check_range("data.targets", d.targets, lambda v: len(v) >= 1 and all(i >= 0 for i in v),
                 "a non-empty list of domain indices >= 0")
    _check_range("model.aal_layers", m.aal_layers, lambda v: all(i >= 0 for i in v) and len(set(v)) == len(v),
                 "distinct block indices >= 0")
    _check_range("train.lr", t.lr, lambda v: finite(v) and v > 0, "finite and > 0")
    _check_range("train.weight_decay", t.weight_decay, lambda v: finite(v) and v >= 0, "finite and >= 0")
    _check_range("train.bma_beta", t.bma_beta, lambda v: finite(v) and v > 0, "finite and > 0")
    _check_range("loss.alpha", loss.alpha, lambda v: finite(v) and v >= 0, "finite and >= 0")
    _check_range("loss.epsilon", loss.epsilon, lambda v: finite(v) and 0 <= v <= 1, "in [0, 1]")
    for name, value in (("loss.smoothing", loss.smoothing), ("loss.temperature", loss.temperature)):
        _check_range(name, value, lambda v: finite(v) and v > 0, "finite and > 0")
    _check_range("loss.aloss", loss.aloss, lambda v: finite(v) and v >= 0, "finite and >= 0")
    if loss.logit_scale is not None:
        _check_range("loss.logit_scale", loss.logit_scale, lambda v: finite(v) and v > 0, "finite and > 0 or null")
    if m.template is not None:
        _check_range("model.template", m.template, lambda v: v.count("{}") == 1,
                     "a prompt with exactly one {} for the class name")
    return cfg


def _specific(table, name, value):
    """The entry of a `per_dataset` / `per_target` mapping that applies to `value`, if any."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"config key {name} must map data set names (or target indices) to "
                          f"config sections, got {table!r}")
    return table.get(value, table.get(str(value)))


def load_config(path=None, overrides=()):
    """The RunConfig of a YAML file (or the defaults) with `--set` overrides, validated."""
    cfg = RunConfig()
    raw = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
    raw = copy.deepcopy(raw)
    raw.pop("variants", None)   # a sweep's ablations (sweep.read_variants): a single run is the base
    per_dataset, per_target = raw.pop("per_dataset", None), raw.pop("per_target", None)
    _merge(cfg, raw)
    updates = [parse_override(text) for text in overrides]
    for update in updates:   # the data set and targets first: they select the per_* entries
        if "data" in update:
            _merge(cfg, {"data": update["data"]})
    entries = [_specific(per_dataset, "per_dataset", cfg.data.dataset)]
    if len(cfg.data.targets) == 1:
        entries.append(_specific(per_target, "per_target", cfg.data.targets[0]))
    for entry in entries:
        if entry is not None:
            _merge(cfg, entry)
    for update in updates:
        _merge(cfg, update)
    return validate(cfg)


def from_dict(data, overrides=()):
    """A RunConfig from `to_dict()` output (a checkpoint's) with `--set` overrides, validated."""
    cfg = RunConfig()
    _merge(cfg, copy.deepcopy(data))
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


# Keys that do not change what a run computes: a resumed run may differ in these.
RUN_NEUTRAL = {"output_dir", "data.root", "data.num_workers", "train.device", "train.compile",
               "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes", "train.eval_batch_size",
               "train.attention_images", "train.logger", "train.wandb_project", "data.skip_corrupt",
               "model.grad_checkpointing"}


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(cfg: RunConfig):
    """Ten hex digits naming what a run computes, less its seed and target domains: the same
    for every run of one method in a sweep, different when any run-changing key differs."""
    flat = _flatten(cfg.to_dict())
    kept = {k: v for k, v in sorted(flat.items()) if k not in RUN_NEUTRAL and k not in ("seed", "data.targets")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_changing_differences(saved: Dict, current: RunConfig):
    """Keys whose values differ between a saved run's configuration and `current` and would
    change what the run computes."""
    a, b = _flatten(saved), _flatten(current.to_dict())
    return sorted(k for k in set(a) | set(b) if k not in RUN_NEUTRAL and a.get(k) != b.get(k))
