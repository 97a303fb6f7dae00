"""ImageNet and its four distribution-shifted test sets, in CoOp's folder layouts under
`data.root` (what the authors' and CLIPood's code read through CoOp's data sets):

    imagenet/classnames.txt                                   "<wnid> <class name>" a line, in label order
    imagenet/images/train/<wnid>/*, imagenet/images/val/<wnid>/*
    imagenetv2/imagenetv2-matched-frequency-format-val/<label index>/*
    imagenet-sketch/images/<wnid>/*
    imagenet-adversarial/imagenet-a/<wnid>/*                  200 of the classes
    imagenet-rendition/imagenet-r/<wnid>/*                    200 of the classes

Labels are positions in classnames.txt. ImageNet-A and -R hold 200 of the 1000 classes and are
scored among their own classes, as CoOp and CLIPood do: their class list is the wnids present
in their folders, in sorted order (read from the disk, never a hard-coded list), and their
labels index that list. A shifted set that is not on the disk is left out (its column reads –).
"""
import os

from .domainbed import DataError
from .samples import Sample, list_images

CLASSNAMES = os.path.join("imagenet", "classnames.txt")
SHIFTED = {  # eval set: (folder under root, how its class folders are named)
    "imagenet_v2": (os.path.join("imagenetv2", "imagenetv2-matched-frequency-format-val"), "index"),
    "imagenet_sketch": (os.path.join("imagenet-sketch", "images"), "wnid"),
    "imagenet_a": (os.path.join("imagenet-adversarial", "imagenet-a"), "subset"),
    "imagenet_r": (os.path.join("imagenet-rendition", "imagenet-r"), "subset"),
}
LABELS = {"imagenet": "ImageNet", "imagenet_v2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch",
          "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R"}


def read_classnames(root):
    """(wnids, class names) in label order, from imagenet/classnames.txt."""
    if root is None:
        raise DataError("data.root must name the folder that holds imagenet/ (and the shifted sets)")
    path = os.path.join(root, CLASSNAMES)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist (CoOp's ImageNet layout: imagenet/classnames.txt, "
                        f"imagenet/images/train|val/<wnid>/)")
    wnids, names = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DataError(f"{path} line {number}: expected '<wnid> <class name>', got {line.strip()!r}")
            wnids.append(parts[0])
            names.append(parts[1].strip())
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{path} must list each wnid once (found {len(wnids)} lines, {len(set(wnids))} distinct)")
    return wnids, names


def _subfolders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _by_wnid(folder, index, what):
    """{label: [Sample]} of a folder of <wnid>/ class folders."""
    unknown = [w for w in _subfolders(folder) if w not in index]
    if unknown:
        raise DataError(f"{folder} holds class folders not in {CLASSNAMES}: {', '.join(unknown[:5])} ({what})")
    return {index[w]: [Sample(p, index[w]) for p in list_images(os.path.join(folder, w))] for w in _subfolders(folder)}


def split(root, name):
    """{label: [Sample]} of imagenet/images/<name> (train or val)."""
    wnids, _ = read_classnames(root)
    folder = os.path.join(root, "imagenet", "images", name)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} does not exist (CoOp's ImageNet layout: imagenet/images/train|val/<wnid>/)")
    found = _by_wnid(folder, {w: i for i, w in enumerate(wnids)}, f"ImageNet {name}")
    if not any(found.values()):
        raise DataError(f"{folder} holds no images")
    return found


def shifted_sets(root):
    """{eval set: (samples, class names)} of the shifted sets found under `root`."""
    wnids, names = read_classnames(root)
    index = {w: i for i, w in enumerate(wnids)}
    out = {}
    for key, (rel, naming) in SHIFTED.items():
        folder = os.path.join(root, rel)
        if not os.path.isdir(folder):
            continue
        if naming == "index":
            bad = [f for f in _subfolders(folder) if not f.isdigit() or int(f) >= len(wnids)]
            if bad:
                raise DataError(f"{folder}: class folders must be label indices 0..{len(wnids) - 1}, got {bad[:5]}")
            samples = [Sample(p, int(f)) for f in sorted(_subfolders(folder), key=int)
                       for p in list_images(os.path.join(folder, f))]
            out[key] = (samples, names)
        elif naming == "wnid":
            found = _by_wnid(folder, index, LABELS[key])
            out[key] = ([s for label in sorted(found) for s in found[label]], names)
        else:   # a subset of the classes, scored among its own
            present = [w for w in wnids if w in set(_subfolders(folder))]
            _by_wnid(folder, index, LABELS[key])   # refuses unknown folders
            own = {w: i for i, w in enumerate(present)}
            samples = [Sample(p, own[w]) for w in present for p in list_images(os.path.join(folder, w))]
            out[key] = (samples, [names[index[w]] for w in present])
    return out
