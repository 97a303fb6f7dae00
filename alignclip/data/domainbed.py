"""DomainBed folders: `root/<dir>/<domain>/<class>/<images>`, domains and classes in sorted order
as torchvision's ImageFolder reads them (hidden folders such as `.ipynb_checkpoints` are not
classes), and DomainBed's own train/validation split of every domain.

DomainBed splits domain i with `misc.split_dataset(env, int(len(env) · holdout),
misc.seed_hash(trial_seed, i))`: the first part of a seeded shuffle is the holdout ("out", 20%),
the rest the training part ("in", 80%). `seed_hash` and `split_dataset` below compute the same
seeds and the same membership.
"""
import hashlib
import os

import numpy as np

from .samples import Sample, list_images

DATASETS = {  # name: (folder under root, domains in sorted order)
    "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"]),
    "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"]),
    "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"]),
    "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43", "location_46"]),
    "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
    "Synthetic": ("Synthetic", None),   # alignclip.data.synthetic; domains read from disk
}
TEMPLATE = "a photo of a {}."


class DataError(ValueError):
    """A data set that cannot be used as it is on disk; the message names the paths."""


def domainbed_seed_hash(*args):
    """DomainBed's `misc.seed_hash`: md5 of str(args), modulo 2³¹."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def split_dataset(items, n, seed):
    """DomainBed's `misc.split_dataset`: (the first n of a seeded shuffle, the rest)."""
    keys = list(range(len(items)))
    np.random.RandomState(seed).shuffle(keys)
    return [items[k] for k in keys[:n]], [items[k] for k in keys[n:]]


def holdout_split(samples, trial_seed, *salt, fraction=0.2):
    """(train "in" part, holdout "out" part) of one domain (or subset), as DomainBed splits it:
    `salt` is the domain index (and, in the wild, "base" or "open")."""
    out, in_ = split_dataset(samples, int(len(samples) * fraction), domainbed_seed_hash(trial_seed, *salt))
    return in_, out


def dataset_dir(root, name):
    if name not in DATASETS:
        raise DataError(f"data.dataset must be one of {', '.join(sorted(DATASETS))} for DomainBed "
                        f"tasks, got {name!r}")
    if root is None:
        raise DataError(f"data.root must name the folder that holds {name}")
    path = os.path.join(root, DATASETS[name][0])
    if not os.path.isdir(path):
        raise DataError(f"dataset folder {path} does not exist (data.root={root}, data.dataset={name})")
    return path


def _subfolders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def load_domains(root, name):
    """(domain names, class names, {domain: [Sample]}), refusing inconsistent folders."""
    path = dataset_dir(root, name)
    domains = DATASETS[name][1] or _subfolders(path)
    missing = [os.path.join(path, d) for d in domains if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise DataError(f"domain folders missing: {', '.join(missing)}")
    if not domains:
        raise DataError(f"no domain folders under {path}")
    class_sets = {d: _subfolders(os.path.join(path, d)) for d in domains}
    classes = sorted(set().union(*class_sets.values()))
    problems = []
    for d in domains:
        lacking = [c for c in classes if c not in class_sets[d]]
        if lacking:
            problems.append(f"{os.path.join(path, d)} lacks class folder(s) {', '.join(lacking)}")
    samples = {d: [Sample(img, label) for label, c in enumerate(classes) if c in class_sets[d]
                   for img in list_images(os.path.join(path, d, c))] for d in domains}
    problems += [f"{os.path.join(path, d)} holds no images" for d in domains if not samples[d]]
    empty = [c for label, c in enumerate(classes)
             if not any(s.label == label for d in domains for s in samples[d])]
    if empty:
        problems.append(f"class folder(s) {', '.join(empty)} hold no images in any domain of {path}")
    if problems:
        raise DataError("; ".join(problems))
    return domains, classes, samples


def base_count(num_classes):
    """In the wild: the first floor(K/2) class indices are base, the rest open."""
    return num_classes // 2
