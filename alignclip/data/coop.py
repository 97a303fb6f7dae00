"""CoOp's data sets from their split files `split_zhou_<Name>.json` ({"train", "val", "test"}:
lists of [image path relative to the image folder, label, class name])."""
import json
import os

from .domainbed import DataError
from .samples import Sample

COOP_DATASETS = {  # name: (folder under root, image folder, split file)
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "FGVCAircraft": ("fgvc_aircraft", "images", "split_zhou_FGVCAircraft.json"),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json"),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "ImageNet": ("imagenet", "images", "split_zhou_ImageNet.json"),
}


def load_split(root, name, split_file=None):
    """({"train", "val", "test"}: [Sample]) and the class names indexed by label."""
    if name not in COOP_DATASETS:
        raise DataError(f"data.dataset must be one of {sorted(COOP_DATASETS)} for open_class, got {name!r}")
    folder, image_dir, default_split = COOP_DATASETS[name]
    base = os.path.join(root, folder)
    path = split_file or os.path.join(base, default_split)
    if not os.path.isfile(path):
        raise DataError(f"split file {path} does not exist (data.root={root}, data.dataset={name})")
    with open(path) as f:
        raw = json.load(f)
    missing = [k for k in ("train", "val", "test") if k not in raw]
    if missing:
        raise DataError(f"split file {path} lacks the list(s) {missing}")
    names = {}
    splits = {}
    for key in ("train", "val", "test"):
        splits[key] = []
        for entry in raw[key]:
            rel, label, classname = entry
            names.setdefault(int(label), classname)
            splits[key].append(Sample(os.path.join(base, image_dir, rel), int(label)))
    k = max(names) + 1
    if sorted(names) != list(range(k)):
        raise DataError(f"split file {path}: labels are not 0..{k - 1}")
    return splits, [names[i] for i in range(k)]
