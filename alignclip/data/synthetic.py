"""Small data sets written to disk: the demo's DomainBed-style set, the same shapes in CoOp's
ImageNet layouts (the ImageNet-shift demo), and photo-like images for timing the pipeline.

Classes differ in shape and in hue (each class has its own, jittered per image); domains differ
in style (background, texture, palette), so what transfers across domains is the object.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "bar"]
HUES = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 30), (200, 60, 200), (40, 200, 210)]
STYLES = ["plain", "night", "noise", "stripes", "checker", "gradient"]


def _background(style, size, rng):
    if style == "plain":
        return np.full((size, size, 3), 235, np.uint8)
    if style == "night":
        return np.full((size, size, 3), 25, np.uint8) + rng.integers(0, 20, (1, 1, 3)).astype(np.uint8)
    if style == "noise":
        return rng.integers(60, 200, (size, size, 3)).astype(np.uint8)
    if style == "stripes":
        img = np.full((size, size, 3), 200, np.uint8)
        period = int(rng.integers(4, 8))
        img[(np.arange(size) // (period // 2)) % 2 == 0] = rng.integers(40, 120, 3)
        return img
    if style == "checker":
        cell = int(rng.integers(4, 9))
        grid = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2)[..., None]
        return np.where(grid == 0, 180, 90).astype(np.uint8).repeat(3, axis=2)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    img = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                    np.full((size, size), 128, np.float32)], -1)
    return img.astype(np.uint8)


def _draw(shape, draw, box, color):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w = x1 - x0
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        draw.rectangle([cx - w / 6, y0, cx + w / 6, y1], fill=color)
        draw.rectangle([x0, cy - w / 6, x1, cy + w / 6], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    else:
        draw.rectangle([x0, cy - w / 5, x1, cy + w / 5], fill=color)


def _image(style, shape, hue, size, rng):
    img = Image.fromarray(_background(style, size, rng))
    draw = ImageDraw.Draw(img)
    extent = rng.uniform(0.45, 0.8) * size
    x0, y0 = rng.uniform(0, size - extent, 2)
    color = tuple(int(c) for c in np.clip(np.array(hue) + rng.integers(-35, 36, 3), 0, 255))
    _draw(shape, draw, (x0, y0, x0 + extent, y0 + extent), color)
    return img


def _check(domains, classes):
    if not 1 <= domains <= len(STYLES) or not 2 <= classes <= len(SHAPES):
        raise ValueError(f"synthetic data: domains must be in 1..{len(STYLES)} and classes in "
                         f"2..{len(SHAPES)}, got {domains} and {classes}")


def write_synthetic(root, *, domains=4, classes=4, per_class=40, size=32, seed=0):
    """Write `root/Synthetic/<style>/<shape>/NNN.png` unless complete already; return its folder."""
    _check(domains, classes)
    out = os.path.join(root, "Synthetic")
    marker = os.path.join(out, f".complete-v2-{domains}-{classes}-{per_class}-{size}-{seed}")
    if os.path.exists(marker):
        return out
    rng = np.random.default_rng(seed)
    for style in STYLES[:domains]:
        for shape, hue in zip(SHAPES[:classes], HUES):
            folder = os.path.join(out, style, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                _image(style, shape, hue, size, rng).save(os.path.join(folder, f"{i:03d}.png"))
    open(marker, "w").close()
    return out


# The ImageNet stand-in's sets: (folder under root, style, classes kept: all, or every n-th)
IMAGENET_SETS = {
    "train": (os.path.join("imagenet", "images", "train"), "plain", 1),
    "val": (os.path.join("imagenet", "images", "val"), "plain", 1),
    "v2": (os.path.join("imagenetv2", "imagenetv2-matched-frequency-format-val"), "plain", 1),
    "sketch": (os.path.join("imagenet-sketch", "images"), "stripes", 1),
    "a": (os.path.join("imagenet-adversarial", "imagenet-a"), "noise", 2),
    "r": (os.path.join("imagenet-rendition", "imagenet-r"), "night", 2),
}


def write_synthetic_imagenet(root, *, classes=4, per_class=40, size=32, seed=0):
    """The demo's shapes in CoOp's ImageNet layouts (`imagenet.py`), unless complete already:
    ImageNet in the plain style (train: per_class a class; val and V2: half that), the shifted
    sets in other styles (Sketch: stripes; A: noise; R: night), A and R holding every other
    class. Returns `root`."""
    _check(1, classes)
    marker = os.path.join(root, f".complete-imagenet-v1-{classes}-{per_class}-{size}-{seed}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(seed)
    wnids = [f"n{index:08d}" for index in range(classes)]
    os.makedirs(os.path.join(root, "imagenet"), exist_ok=True)
    with open(os.path.join(root, "imagenet", "classnames.txt"), "w") as f:
        f.writelines(f"{w} {shape}\n" for w, shape in zip(wnids, SHAPES[:classes]))
    for name, (folder, style, every) in IMAGENET_SETS.items():
        count = per_class if name == "train" else max(per_class // 2, 1)
        for index, (shape, hue) in enumerate(zip(SHAPES[:classes], HUES)):
            if index % every:
                continue
            target = os.path.join(root, folder, str(index) if name == "v2" else wnids[index])
            os.makedirs(target, exist_ok=True)
            for i in range(count):
                _image(style, shape, hue, size, rng).save(os.path.join(target, f"{i:03d}.png"))
    open(marker, "w").close()
    return root


def photo_like(width, height, seed):
    """A smooth random colour field with fine noise (a PIL image): at JPEG quality 90 it
    compresses, and so decodes, like a photograph, unlike flat noise. The input-pipeline
    measurements time these (`benchmarks/fake_domainbed.py`)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (field[0] + 0.08 * torch.randn(3, height, width, generator=gen)).clamp(0, 1)
    return Image.fromarray((pixels * 255).byte().permute(1, 2, 0).numpy())
