"""The papers' preprocessing, by name, in two forms: the authors' plain torchvision `Compose`
(the reference the tests hold the pipeline to) and the parameters the input pipeline draws for
each image, which `device_transforms.py` applies on the training device.

- `alignclip`: the authors' replacement of DomainBed's transforms (marked "Important!" in
  their README, for DomainBed's `MultipleEnvironmentImageFolder`): train
  `RandomResizedCrop(224, scale=(0.7, 1.0))`, `RandomHorizontalFlip()`, `ToTensor()`,
  `Normalize(CLIP mean, CLIP std)`; eval `Resize(224)`, `CenterCrop(224)`, `ToTensor()`,
  `Normalize(CLIP mean, CLIP std)`. The default for every DomainBed-data task.
- `coop`: CoOp's data sets in the authors' code: the same crop, flip and CLIP normalisation
  (the name says where the data comes from; the default for open-class tasks).
- `domainbed`: DomainBed's stock transforms, which the authors replaced: the same crop and flip,
  `ColorJitter(0.3, 0.3, 0.3, 0.3)`, `RandomGrayscale()`, ImageNet mean/std; eval
  `Resize((224, 224))`.

Per image the pipeline draws, in the `Compose`'s order and with its arithmetic, from a
generator seeded by the item: the crop box, the flip, then (domainbed) the jitter order and
factors and the grayscale coin. So for the same seed the draws are the authors' draws.

Parameter vector of one image (float32, `PARAMS` entries):
    0-3 crop top, left, height, width (input pixels)   4-5 resized height, width
    6-7 output window top, left in the resized image    8 flip
    9-12 brightness, contrast, saturation, hue factors  13-16 jitter order (-1: no jitter op)
    17 grayscale
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALE = (0.7, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
PARAMS = 18
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)
NO_JITTER = (-1.0, -1.0, -1.0, -1.0)   # the order of an image that is not jittered


@dataclass(frozen=True)
class Preprocessing:
    name: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    jitter: Optional[float] = None     # ColorJitter(j, j, j, j), or none
    grayscale: float = 0.0             # RandomGrayscale's p
    eval_square: bool = False          # eval Resize((s, s)) instead of Resize(s) + CenterCrop(s)


KINDS = {
    "alignclip": Preprocessing("alignclip", CLIP_MEAN, CLIP_STD),
    "coop": Preprocessing("coop", CLIP_MEAN, CLIP_STD),
    "domainbed": Preprocessing("domainbed", IMAGENET_MEAN, IMAGENET_STD, jitter=0.3, grayscale=0.1,
                               eval_square=True),
}


def preprocessing(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (data.transforms, auto resolved), got {kind!r}")
    return KINDS[kind]


def reference_train(kind, size):
    """The authors' training `Compose` for `kind` (PIL in, normalised tensor out)."""
    spec = preprocessing(kind)
    ops = [T.RandomResizedCrop(size, scale=CROP_SCALE), T.RandomHorizontalFlip()]
    if spec.jitter:
        ops += [T.ColorJitter(spec.jitter, spec.jitter, spec.jitter, spec.jitter), T.RandomGrayscale(spec.grayscale)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def reference_eval(kind, size):
    spec = preprocessing(kind)
    resize = [T.Resize((size, size))] if spec.eval_square else [T.Resize(size), T.CenterCrop(size)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])


LOG_RATIO = tuple(torch.log(torch.tensor(CROP_RATIO)).tolist())   # float32 values, as get_params has them


def _uniform(gen, low, high):
    return torch.empty(1).uniform_(low, high, generator=gen)


def crop_box(gen, height, width):
    """RandomResizedCrop.get_params's draws and arithmetic, from `gen`: (top, left, h, w)."""
    area = height * width
    draw = torch.empty(1)
    for _ in range(10):
        target_area = area * draw.uniform_(*CROP_SCALE, generator=gen).item()
        aspect = draw.uniform_(*LOG_RATIO, generator=gen).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen))
            return top, left, h, w
    ratio = width / height   # ten misses: the central crop at the nearest allowed ratio
    if ratio < min(CROP_RATIO):
        w, h = width, int(round(width / min(CROP_RATIO)))
    elif ratio > max(CROP_RATIO):
        w, h = int(round(height * max(CROP_RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_params(spec, size, height, width, gen):
    """One training image's parameter vector (module docstring), drawn from `gen`."""
    top, left, h, w = crop_box(gen, height, width)
    flip = float(torch.rand(1, generator=gen).item() < 0.5)
    factors, order, gray = IDENTITY_JITTER, NO_JITTER, 0.0
    if spec.jitter:
        j = spec.jitter
        order = tuple(float(i) for i in torch.randperm(4, generator=gen).tolist())
        factors = tuple(_uniform(gen, *bounds).item()
                        for bounds in ((max(0.0, 1 - j), 1 + j),) * 3 + ((-j, j),))
        gray = float(torch.rand(1, generator=gen).item() < spec.grayscale)
    return torch.tensor([top, left, h, w, size, size, 0, 0, flip, *factors, *order, gray], dtype=torch.float32)


def eval_params(spec, size, height, width):
    """One evaluation image's parameter vector: torchvision's Resize (shorter side, or both
    sides for `eval_square`) then CenterCrop, as output sizes and a window."""
    if spec.eval_square:
        out_h = out_w = size
    elif width <= height:
        out_w, out_h = size, int(size * height / width)
    else:
        out_h, out_w = size, int(size * width / height)
    top, left = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
    return torch.tensor([0, 0, height, width, out_h, out_w, top, left, 0, *IDENTITY_JITTER, *NO_JITTER, 0],
                        dtype=torch.float32)
