"""One group per image size (PACS's 227x227 and DomainNet's 500x375, generated JPEGs): the
training input pipeline for one batch of the authors' preprocessing, in one process on one core.

- `reference`: the authors' `Compose` over PIL per image (`load_rgb`, RandomResizedCrop,
  flip, ToTensor, Normalize), then stacking the batch;
- `torchvision-v2`: the strongest PyTorch alternative on equal terms: torchvision's JPEG decode
  to a uint8 tensor, then `transforms.v2` on the tensor (RandomResizedCrop with antialias, flip,
  ToDtype, Normalize), stacked; the same crop distribution, its own draws;
- `ours-worker`: what a data worker of ours does for the batch (decode, draw the parameters,
  collate into one uint8 tensor); the pixel work is left to the training device;
- `ours-end-to-end`: the worker's batch plus that device work (crop, resize, flip, normalise)
  run on this benchmark's device. On a CPU the device work competes for the same core, so
  this row is slower there than on a GPU, and it is reported as such.

`images` in each row lets the report give images/s.
"""
import pytest
import torch
from PIL import Image

from alignclip.data import ImageItems, collate, preprocessing, reference_train
from alignclip.data.device_transforms import DeviceTransform
from alignclip.data.samples import Sample, load_rgb
from conftest import CUDA, DEVICE, measure, sync

SIZE = 224
BATCH = 32 if CUDA else 12
SHAPES = {"227x227 (PACS)": (227, 227), "500x375 (DomainNet)": (500, 375)}
PROVIDERS = ["reference", "torchvision-v2", "ours-worker", "ours-end-to-end"]


def _photo_like(width, height, seed):
    """Smooth colour fields with fine noise: compresses like a photograph, not like flat noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (field[0] + 0.08 * torch.randn(3, height, width, generator=gen)).clamp(0, 1)
    return Image.fromarray((pixels * 255).byte().permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (width, height) in SHAPES.items():
        root = tmp_path_factory.mktemp(f"jpeg{width}x{height}")
        paths = []
        for i in range(BATCH):
            path = root / f"{i:03d}.jpg"
            _photo_like(width, height, i).save(path, quality=90)
            paths.append(str(path))
        out[name] = paths
    return out


def _reference(paths):
    compose = reference_train("alignclip", SIZE)

    def run():
        return torch.stack([compose(load_rgb(p)) for p in paths])
    return run


def _torchvision_v2(paths):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    spec = preprocessing("alignclip")
    compose = v2.Compose([v2.RandomResizedCrop(SIZE, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])

    def run():
        return torch.stack([compose(decode_jpeg(read_file(p), mode=ImageReadMode.RGB)) for p in paths])
    return run


def _worker(paths):
    items = ImageItems([Sample(p, 0) for p in paths], "alignclip", SIZE)

    def run():
        return collate([items[(i, 1000 + i)] for i in range(len(paths))])
    return run


def _end_to_end(paths):
    worker = _worker(paths)
    transform = DeviceTransform(preprocessing("alignclip"), SIZE, DEVICE)

    def run():
        images, params, _ = worker()
        out = transform(images.to(DEVICE, non_blocking=True), params.to(DEVICE, non_blocking=True))
        sync()
        return out
    return run


BUILDERS = {"reference": _reference, "torchvision-v2": _torchvision_v2, "ours-worker": _worker,
            "ours-end-to-end": _end_to_end}
BACKENDS = {"reference": "PIL + torchvision.transforms", "torchvision-v2": "torchvision.io + transforms.v2",
            "ours-worker": "torchvision.io (PIL for non-JPEG)", "ours-end-to-end": f"worker + {DEVICE.type}"}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pipeline(benchmark, folders, provider, shape):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # a data worker's core; the device row on a GPU is not bound by it
    try:
        measure(benchmark, BUILDERS[provider](folders[shape]), group=f"input-pipeline {shape} B={BATCH}",
                provider=provider, images=BATCH, rounds=None if CUDA else 15)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["backend"] = BACKENDS[provider]
