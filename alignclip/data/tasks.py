"""The four tasks as training domains and evaluation sets, split as the authors split them.

- domain_shift (DomainBed): train on the sources' "in" 80%, `val` = their "out" 20% (model
  selection), `test` = the targets' "out" 20% (CLIPood's rule).
- in_the_wild (DomainBed with open classes): the first floor(K/2) class indices are base. Each
  domain's base and open subsets split as DomainBed with salts "base" / "open". Train on the
  sources' base "in" part; `val` = their base "out" part against the base names; `test` /
  `open` = the whole target domain's base / open images (both parts), against all class names.
- open_class (CoOp): the first ceil(K/2) labels are base; train on base (n-shot if asked),
  `val` = base val split, `test` = base test split against the base names, `open` = the new
  classes' test split against the new names.
- imagenet_shift (CoOp's ImageNet layouts, `imagenet.py`): train on all classes, n shots a class
  (`data.shots`, 16 in configs/imagenet.yaml) drawn with the run's seed; `val` = HELD_OUT further
  training images a class, never a test image (model selection); `imagenet` = ImageNet's val
  split; `imagenet_v2`, `imagenet_sketch`, `imagenet_a`, `imagenet_r` = the shifted sets found
  on the disk, A and R against their own 200 class names.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from . import coop, domainbed, imagenet
from .domainbed import DataError
from .samples import Sample, seed_hash


@dataclass
class EvalSet:
    samples: List[Sample]          # labels index `classnames`
    classnames: List[str]
    domains: List[Tuple[str, int]] = field(default_factory=list)   # (domain, images) in sample order


@dataclass
class Task:
    classnames: List[str]                  # training classes, in label order
    train_domains: List[List[Sample]]      # one batch from each per step
    domain_names: List[str]
    eval_sets: Dict[str, EvalSet]
    template: str                          # the data set's prompt


def _over_domains(named_parts, classnames):
    """The EvalSet of [(domain, samples)]: the samples concatenated, each domain's count kept."""
    return EvalSet([s for _, part in named_parts for s in part], classnames,
                   [(name, len(part)) for name, part in named_parts])


def _targets(targets, domains):
    bad = [t for t in targets if not 0 <= t < len(domains)]
    if bad:
        raise DataError(f"data.targets {bad} out of range: {len(domains)} domains {domains}")
    if len(set(targets)) == len(domains):
        raise DataError(f"data.targets {targets} leave no source domain among {domains}")
    return set(targets)


def _keep(samples, labels, offset=0):
    return [Sample(s.path, s.label - offset) for s in samples if s.label in labels]


HELD_OUT = 4   # imagenet_shift: training images a class kept apart for model selection


def _draws(samples, n, seed, extra=0):
    """Per class, a seeded permutation: (its first n, the next `extra`), in file order."""
    by_class = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    picked, kept = [], []
    for label, items in sorted(by_class.items()):
        order = np.random.RandomState(seed_hash(seed, "shots", label)).permutation(len(items))
        picked += [items[i] for i in sorted(order[:n])]
        kept += [items[i] for i in sorted(order[n:n + extra])]
    return picked, kept


def _shots(samples, n, seed):
    return samples if n is None else _draws(samples, n, seed)[0]


def _imagenet_shift(data, seed):
    wnids, names = imagenet.read_classnames(data.root)
    train_split = [s for items in imagenet.split(data.root, "train").values() for s in items]
    shots = data.shots if data.shots is not None else max(len(train_split) // len(wnids) - HELD_OUT, 1)
    train, held_out = _draws(train_split, shots, seed, HELD_OUT)
    val = [s for items in imagenet.split(data.root, "val").values() for s in items]
    sets = {"val": EvalSet(held_out, names),
            "imagenet": _over_domains([(imagenet.LABELS["imagenet"], val)], names)}
    for key, (samples, classnames) in imagenet.shifted_sets(data.root).items():
        sets[key] = _over_domains([(imagenet.LABELS[key], samples)], classnames)
    return Task(names, [train], ["ImageNet"], sets, coop.template("ImageNet"))


def _open_class(data, seed):
    splits, names = coop.load_split(data.root, data.dataset, data.split_file)
    m = coop.base_count(len(names))
    base, new = set(range(m)), set(range(m, len(names)))
    train = _shots(_keep(splits["train"], base), data.shots, seed)
    return Task(names[:m], [train], [data.dataset], {
        "val": EvalSet(_keep(splits["val"], base), names[:m]),
        "test": _over_domains([(data.dataset, _keep(splits["test"], base))], names[:m]),
        "open": _over_domains([(data.dataset, _keep(splits["test"], new, m))], names[m:]),
    }, coop.template(data.dataset))


def _domain_shift(data, domains, classes, samples, targets):
    parts = [domainbed.holdout_split(samples[d], data.split_seed, i, fraction=data.holdout_fraction)
             for i, d in enumerate(domains)]
    sources = [i for i in range(len(domains)) if i not in targets]
    return Task(classes, [parts[i][0] for i in sources], [domains[i] for i in sources], {
        "val": _over_domains([(domains[i], parts[i][1]) for i in sources], classes),
        "test": _over_domains([(domains[i], parts[i][1]) for i in sorted(targets)], classes),
    }, domainbed.TEMPLATE)


def _in_the_wild(data, domains, classes, samples, targets):
    m = domainbed.base_count(len(classes))
    base, open_ = set(range(m)), set(range(m, len(classes)))
    sources = [i for i in range(len(domains)) if i not in targets]
    splits = {i: domainbed.holdout_split(_keep(samples[domains[i]], base), data.split_seed, i, "base",
                                         fraction=data.holdout_fraction) for i in sources}
    whole = [(domains[i], samples[domains[i]]) for i in sorted(targets)]
    return Task(classes[:m], [splits[i][0] for i in sources], [domains[i] for i in sources], {
        "val": _over_domains([(domains[i], splits[i][1]) for i in sources], classes[:m]),
        "test": _over_domains([(name, _keep(part, base)) for name, part in whole], classes),
        "open": _over_domains([(name, _keep(part, open_)) for name, part in whole], classes),
    }, domainbed.TEMPLATE)


def build_task(data, task, seed):
    """The Task for a DataConfig (`data`), task name and run seed."""
    if task == "open_class":
        return _open_class(data, seed)
    if task == "imagenet_shift":
        return _imagenet_shift(data, seed)
    if task not in ("domain_shift", "in_the_wild"):
        raise DataError(f"task must be domain_shift, open_class, in_the_wild or imagenet_shift, got {task!r}")
    domains, classes, samples = domainbed.load_domains(data.root, data.dataset)
    targets = _targets(data.targets, domains)
    build = _domain_shift if task == "domain_shift" else _in_the_wild
    return build(data, domains, classes, samples, targets)
