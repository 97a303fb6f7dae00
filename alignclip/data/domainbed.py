"""DomainBed folders: `root/<dir>/<domain>/<class>/*.jpg`, domains and classes sorted.

Each domain splits into a 20% holdout and an 80% train part with a seed derived from the run's
seed and the domain index (CLIPood's rule, after DomainBed): train on the sources' 80%, validate
on their 20%, test on the targets' 20%.
"""
import math
import os

import numpy as np

from .samples import Sample, list_images, seed_hash

DATASETS = {  # name: (folder under root, domains in sorted order)
    "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"]),
    "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"]),
    "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"]),
    "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43", "location_46"]),
    "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
    "Synthetic": ("Synthetic", None),   # alignclip.data.synthetic; domains read from disk
}


class DataError(ValueError):
    """A data set that cannot be used as it is on disk; the message names the paths."""


def dataset_dir(root, name):
    if name not in DATASETS:
        raise DataError(f"data.dataset must be one of {sorted(DATASETS)}, got {name!r}")
    path = os.path.join(root, DATASETS[name][0])
    if not os.path.isdir(path):
        raise DataError(f"dataset folder {path} does not exist (data.root={root}, data.dataset={name})")
    return path


def load_domains(root, name):
    """(domain names, class names, {domain: [Sample]}), refusing inconsistent folders."""
    path = dataset_dir(root, name)
    domains = DATASETS[name][1] or sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    missing = [os.path.join(path, d) for d in domains if not os.path.isdir(os.path.join(path, d))]
    if missing:
        raise DataError(f"domain folders missing: {', '.join(missing)}")
    if not domains:
        raise DataError(f"no domain folders under {path}")
    class_sets = {d: sorted(c for c in os.listdir(os.path.join(path, d))
                            if os.path.isdir(os.path.join(path, d, c))) for d in domains}
    classes = sorted(set().union(*class_sets.values()))
    problems = []
    for d in domains:
        lacking = [c for c in classes if c not in class_sets[d]]
        if lacking:
            problems.append(f"{os.path.join(path, d)} lacks class folder(s) {', '.join(lacking)}")
    samples = {}
    for d in domains:
        samples[d] = [Sample(img, label) for label, c in enumerate(classes) if c in class_sets[d]
                      for img in list_images(os.path.join(path, d, c))]
        if not samples[d]:
            problems.append(f"{os.path.join(path, d)} holds no images")
    if problems:
        raise DataError("; ".join(problems))
    return domains, classes, samples


def holdout_split(samples, seed, domain_index, fraction=0.2):
    """(train 80%, holdout 20%) with a permutation seeded by (seed, domain index)."""
    keys = np.arange(len(samples))
    np.random.RandomState(seed_hash(seed, domain_index)).shuffle(keys)
    n_out = int(len(samples) * fraction)
    return [samples[i] for i in sorted(keys[n_out:])], [samples[i] for i in sorted(keys[:n_out])]


def base_count(num_classes):
    """Open-class splits: the first ceil(K/2) sorted classes are base, the rest new/open."""
    return math.ceil(num_classes / 2)
