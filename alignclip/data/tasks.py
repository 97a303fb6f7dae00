"""The three tasks of SPEC.md section 8 as training domains and evaluation sets.

- domain_shift: train on the source domains' 80%, `val` = their 20%, `test` = the targets' 20%.
- in_the_wild: the same folders; the first ceil(K/2) sorted classes are base. Train on the
  sources' base classes; `val` = sources' base holdout against the base names; `test` / `open`
  = the targets' base / open images, each against all class names.
- open_class: a CoOp split file; train on base, `val` = base val split, `test` = base test
  split against the base names, `open` = new test split against the new names.
"""
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from . import coop, domainbed
from .domainbed import DataError
from .samples import Sample, seed_hash


@dataclass
class EvalSet:
    samples: List[Sample]          # labels index `classnames`
    classnames: List[str]


@dataclass
class Task:
    classnames: List[str]                  # training classes, in label order
    train_domains: List[List[Sample]]      # one batch from each per step
    domain_names: List[str]
    eval_sets: Dict[str, EvalSet]


def _targets(targets, domains):
    if not targets:
        raise DataError("data.targets must name at least one target domain index")
    bad = [t for t in targets if not 0 <= t < len(domains)]
    if bad:
        raise DataError(f"data.targets {bad} out of range: {len(domains)} domains {domains}")
    if len(set(targets)) == len(domains):
        raise DataError(f"data.targets {targets} leave no source domain among {domains}")
    return set(targets)


def _relabel(samples, keep, offset=0):
    return [Sample(s.path, s.label - offset) for s in samples if keep(s.label)]


def _shots(samples, n, seed):
    if n is None:
        return samples
    by_class = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    picked = []
    for label, items in sorted(by_class.items()):
        order = np.random.RandomState(seed_hash(seed, "shots", label)).permutation(len(items))
        picked += [items[i] for i in sorted(order[:n])]
    return picked


def build_task(data_cfg, task, seed):
    if task == "open_class":
        splits, names = coop.load_split(data_cfg["root"], data_cfg["dataset"], data_cfg["split_file"])
        m = domainbed.base_count(len(names))
        base = lambda y: y < m  # noqa: E731
        train = _shots(_relabel(splits["train"], base), data_cfg["shots"], seed)
        return Task(names[:m], [train], [data_cfg["dataset"]], {
            "val": EvalSet(_relabel(splits["val"], base), names[:m]),
            "test": EvalSet(_relabel(splits["test"], base), names[:m]),
            "open": EvalSet(_relabel(splits["test"], lambda y: y >= m, m), names[m:]),
        })
    domains, classes, samples = domainbed.load_domains(data_cfg["root"], data_cfg["dataset"])
    targets = _targets(data_cfg["targets"], domains)
    frac = data_cfg["holdout_fraction"]
    parts = [domainbed.holdout_split(samples[d], seed, i, frac) for i, d in enumerate(domains)]
    sources = [i for i in range(len(domains)) if i not in targets]
    hold_src = [s for i in sources for s in parts[i][1]]
    hold_tgt = [s for i in sorted(targets) for s in parts[i][1]]
    if task == "domain_shift":
        train = [parts[i][0] for i in sources]
        evals = {"val": EvalSet(hold_src, classes), "test": EvalSet(hold_tgt, classes)}
        return Task(classes, train, [domains[i] for i in sources], evals)
    if task == "in_the_wild":
        m = domainbed.base_count(len(classes))
        base = lambda y: y < m  # noqa: E731
        train = [_relabel(parts[i][0], base) for i in sources]
        evals = {"val": EvalSet(_relabel(hold_src, base), classes[:m]),
                 "test": EvalSet(_relabel(hold_tgt, base), classes),
                 "open": EvalSet(_relabel(hold_tgt, lambda y: y >= m), classes)}
        return Task(classes[:m], train, [domains[i] for i in sources], evals)
    raise DataError(f"task must be domain_shift, open_class or in_the_wild, got {task!r}")
