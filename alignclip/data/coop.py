"""CoOp's data sets from their split files `split_zhou_<Name>.json` ({"train", "val", "test"}:
lists of [image path relative to the image folder, label, class name]), with CoOp's prompts."""
import json
import math
import os

from .domainbed import DataError
from .samples import Sample

COOP_DATASETS = {  # name: (folder under root, image folder, split file, prompt template)
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                   "a photo of a {}, a type of flower."),
    "FGVCAircraft": ("fgvc_aircraft", "images", "split_zhou_FGVCAircraft.json",
                     "a photo of a {}, a type of aircraft."),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "Food101": ("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    "ImageNet": ("imagenet", "images", "split_zhou_ImageNet.json", "a photo of a {}."),
}


def template(name):
    return COOP_DATASETS[name][3]


def base_count(num_classes):
    """CoOp's base-to-new split: the first ceil(K/2) sorted labels are base, the rest new."""
    return math.ceil(num_classes / 2)


def load_split(root, name, split_file=None):
    """({"train", "val", "test"}: [Sample]) and the class names indexed by label."""
    if name not in COOP_DATASETS:
        raise DataError(f"data.dataset must be one of {', '.join(sorted(COOP_DATASETS))} for "
                        f"open_class, got {name!r}")
    if root is None and split_file is None:
        raise DataError(f"data.root must name the folder that holds {name}")
    folder, image_dir, default_split, _ = COOP_DATASETS[name]
    base = os.path.join(root or "", folder)
    path = split_file or os.path.join(base, default_split)
    if not os.path.isfile(path):
        raise DataError(f"split file {path} does not exist (data.root={root}, data.dataset={name})")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"split file {path} cannot be read as JSON: {exc}") from None
    missing = [k for k in ("train", "val", "test") if k not in raw]
    if missing:
        raise DataError(f"split file {path} lacks the list(s) {', '.join(missing)}")
    names, splits = {}, {}
    for key in ("train", "val", "test"):
        splits[key] = []
        for entry in raw[key]:
            rel, label, classname = entry
            names.setdefault(int(label), classname)
            splits[key].append(Sample(os.path.join(base, image_dir, rel), int(label)))
    k = max(names) + 1 if names else 0
    if sorted(names) != list(range(k)) or k == 0:
        raise DataError(f"split file {path}: labels are not 0..K-1 for some K >= 1")
    return splits, [names[i] for i in range(k)]
