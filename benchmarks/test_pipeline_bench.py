"""One group per transform (the authors' preprocessing; DomainBed's stock one with ColorJitter
and RandomGrayscale) and image size (PACS's 227x227 and DomainNet's 500x375, generated
photo-like JPEGs): one training batch of the input pipeline, everything counted, in one process
on one thread (a data worker's core).

- `reference`: that transform's `Compose` over PIL per image (decode, RandomResizedCrop, flip,
  [ColorJitter, RandomGrayscale,] ToTensor, Normalize), then stacking the batch: what the
  authors' (and DomainBed's) loaders do;
- `torchvision-v2`: the strongest PyTorch alternative on equal terms: torchvision's JPEG decode
  to a uint8 tensor, then `transforms.v2` on the tensor (the same ops, antialiased resize), per
  image, stacked; its own draws;
- `ours-host`: everything our host does for the batch: read, decode, draw, crop and resize,
  collate into one uint8 batch (and pin it on CUDA);
- `ours-in-all`: `ours-host` plus the per-pixel work on this benchmark's device (flip, jitter,
  normalisation). On a CPU that is the whole price of a CPU-only run; on a GPU the device part
  runs beside the model.

`images` in each row lets the report give images/s; on one thread the wall time is the CPU time.
"""
import pytest
import torch

from alignclip.data import ImageItems, collate, preprocessing, reference_train
from alignclip.data.decode import load_rgb
from alignclip.data.device_transforms import DeviceTransform
from alignclip.data.samples import Sample
from alignclip.data.synthetic import photo_like
from conftest import CUDA, DEVICE, measure, sync

SIZE = 224
BATCH = 32 if CUDA else 12
SHAPES = {"227x227": (227, 227), "500x375": (500, 375)}
KINDS = ["alignclip", "domainbed"]
PROVIDERS = ["reference", "torchvision-v2", "ours-host", "ours-in-all"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (width, height) in SHAPES.items():
        root = tmp_path_factory.mktemp(f"jpeg{width}x{height}")
        paths = []
        for i in range(BATCH):
            path = root / f"{i:03d}.jpg"
            photo_like(width, height, i).save(path, quality=90)
            paths.append(str(path))
        out[name] = paths
    return out


def _reference(paths, kind):
    compose = reference_train(kind, SIZE)

    def run():
        return torch.stack([compose(load_rgb(p)) for p in paths])
    return run


def _torchvision_v2(paths, kind):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    spec = preprocessing(kind)
    ops = [v2.RandomResizedCrop(SIZE, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if spec.jitter:
        ops += [v2.ColorJitter(spec.jitter, spec.jitter, spec.jitter, spec.jitter), v2.RandomGrayscale(spec.grayscale)]
    compose = v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])

    def run():
        return torch.stack([compose(decode_jpeg(read_file(p), mode=ImageReadMode.RGB)) for p in paths])
    return run


def _host(paths, kind):
    items = ImageItems([Sample(p, 0) for p in paths], kind, SIZE)

    def run():
        images, params, labels, _ = collate([items[(i, 1000 + i)] for i in range(len(paths))])
        if CUDA:
            return images.pin_memory(), params.pin_memory(), labels.pin_memory()
        return images, params, labels
    return run


def _in_all(paths, kind):
    host = _host(paths, kind)
    transform = DeviceTransform(preprocessing(kind), DEVICE)

    def run():
        images, params, _ = host()
        out = transform(images.to(DEVICE, non_blocking=True), params.to(DEVICE, non_blocking=True))
        sync()
        return out
    return run


BUILDERS = {"reference": _reference, "torchvision-v2": _torchvision_v2, "ours-host": _host, "ours-in-all": _in_all}
BACKENDS = {"reference": "PIL + torchvision.transforms", "torchvision-v2": "torchvision.io + transforms.v2",
            "ours-host": "torchvision.io (PIL draft for large JPEGs, PIL for non-JPEG) + uint8 antialiased resize",
            "ours-in-all": f"host + pixel_transform on {DEVICE.type}"}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pipeline(benchmark, folders, provider, kind, shape):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # a data worker's core; the device row on a GPU is not bound by it
    try:
        measure(benchmark, BUILDERS[provider](folders[shape], kind), group=f"input-pipeline {kind} {shape} B={BATCH}",
                provider=provider, images=BATCH, rounds=None if CUDA else 7)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["backend"] = BACKENDS[provider]
