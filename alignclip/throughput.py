"""`python -m alignclip pipeline --config F [--steps N] [--workers W]`: what the training input
pipeline delivers on this machine, beside the authors' plain torchvision `Compose` over PIL on
the same files with the same draws, and how many cores would feed an H200.

Measured, in one run:
- per core: images per CPU-second in this process, over the configured steps' items (the
  first step is a warm-up, not counted): ours = what a data worker does (decode, draw, collate);
  the authors' = `Compose` per image plus stacking the batch;
- device work: the pixel work moved off the workers (crop, resize, flip, jitter, normalise) per
  batch on the training device: CPU-seconds on a CPU, CUDA-event time on a GPU. It is work, not
  free, and reported as such;
- in all: images per second of wall time through the real DataLoader with W workers, copied
  to the device and transformed, as the training loop receives them;
- main thread per step: with the workers' batches already prefetched and the model a no-op, the
  host time of taking a batch and queueing its copy to the device (and, on a GPU, its
  transform): the loop's own cost, which bounds the steps/s the host can issue.

Modelled (labelled as a model, not a measurement): the tower's training FLOPs per image
(forward and backward, about 3x the forward multiply-adds x 2, the D-V path included), the
images/s an H200 at 50% of its dense bf16 peak would consume, and the cores each pipeline
would need to keep it fed.
"""
import time

import torch

from alignclip_kernels.roofline import H200_TENSOR_FLOPS

from .clip import build_architecture
from .config import resolved_transforms
from .data import DeviceBatches, ImageItems, build_task, collate, preprocessing, reference_train, train_loader
from .data.device_transforms import DeviceTransform
from .data.pipeline import StepSampler, worker_count
from .data.samples import load_rgb
from .distributed import Dist, resolve_device
from .evaluate import image_size


def training_flops(visual, dual_layers):
    """Modelled training FLOPs per image of an open_clip ViT tower with the dual path:
    3 x 2 x forward multiply-adds (the backward is about twice the forward)."""
    t = visual.transformer
    width, layers = t.width, t.layers
    grid = visual.grid_size[0] * visual.grid_size[1]
    tokens = grid + 1
    hidden = t.resblocks[0].mlp.c_fc.out_features
    patch = visual.conv1.weight[0].numel()
    out_dim = visual.output_dim
    block = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    macs = grid * patch * width + layers * block + dual_layers * tokens * width * width + 2 * tokens * width * out_dim
    return 3 * 2 * macs


def per_image_rate(images, seconds):
    return images / max(seconds, 1e-9)


def _cpu_seconds(fn):
    started = time.process_time()
    fn()
    return time.process_time() - started


def _device_seconds(fn, device):
    if device.type != "cuda":
        return _cpu_seconds(fn)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def measure(cfg, steps=20, workers=None):
    """The measurements of the module docstring, as a dict."""
    from .train import data_config

    torch.set_num_threads(1)   # per-core figures: one core's work
    ddp = Dist()
    device = resolve_device(cfg.train.device, ddp)
    task = build_task(data_config(cfg, ddp), cfg.task, cfg.seed)
    visual = build_architecture(cfg.model, torch.device("cpu")).visual
    size, kind = image_size(visual), resolved_transforms(cfg)
    samples = [s for d in task.train_domains for s in d]
    items = ImageItems(samples, kind, size, cfg.data.skip_corrupt)
    steps = max(steps, 2)
    batches = list(StepSampler([len(d) for d in task.train_domains], cfg.data.batch_size, cfg.seed, 0, steps))
    reference = reference_train(kind, size)

    def authors(batch):
        out = []
        for index, seed in batch:
            torch.manual_seed(seed)        # the same draws as ours, for the same crops
            out.append(reference(load_rgb(samples[index].path)))
        return torch.stack(out)

    ours_batches = [collate([items[i] for i in batches[0]])]
    authors(batches[0])
    images = sum(len(b) for b in batches[1:])
    ours_s = _cpu_seconds(lambda: ours_batches.extend(collate([items[i] for i in b]) for b in batches[1:]))
    authors_s = _cpu_seconds(lambda: [authors(b) for b in batches[1:]])

    transform = DeviceTransform(preprocessing(kind), size, device)
    moved = [(img.to(device), params.to(device)) for img, params, _ in ours_batches[1:]]
    transform(*moved[0])
    device_s = _device_seconds(lambda: [transform(*m) for m in moved], device)

    workers = worker_count(cfg.data.num_workers if workers is None else workers)

    def loader():
        return train_loader(task.train_domains, kind, size, batch_size=cfg.data.batch_size, seed=cfg.seed,
                            start=0, stop=steps, workers=workers, device=device, skip_corrupt=cfg.data.skip_corrupt)

    host_ms = None
    if workers > 0:
        prefetched = DeviceBatches(loader(), kind, size, device).moved()
        first = next(prefetched)
        time.sleep(0.5 + 1.5 * steps * len(batches[0]) / per_image_rate(images, ours_s) / workers)
        host = []
        for _ in range(min(steps - 1, 3)):   # the helper thread holds three batches ahead
            started = time.perf_counter()
            img, params, labels = next(prefetched)
            if device.type == "cuda":
                transform(img, params)
            host.append(time.perf_counter() - started)
        host_ms = 1e3 * sorted(host)[len(host) // 2]
        del prefetched, first
    delivered = DeviceBatches(loader(), kind, size, device)
    stream = iter(delivered)
    next(stream)
    started = time.perf_counter()
    for _ in stream:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    flops = training_flops(visual, cfg.model.dual_layers)
    h200 = 0.5 * H200_TENSOR_FLOPS / flops
    per_core = {"ours": images / ours_s, "authors": images / authors_s}
    return {"dataset": cfg.data.dataset, "transforms": kind, "image_size": size, "steps": steps - 1,
            "batch": len(batches[0]), "images": images, "per_core": per_core,
            "speedup_per_core": per_core["ours"] / per_core["authors"],
            "device": str(device), "device_ms_per_batch": 1e3 * device_s / len(moved), "host_ms_per_step": host_ms,
            "device_images_per_s": images / device_s, "workers": workers, "in_all": images / wall,
            "model": {"arch": cfg.model.arch, "train_gflop_per_image": flops / 1e9, "h200_images_per_s": h200,
                      "cores_ours": h200 / per_core["ours"], "cores_authors": h200 / per_core["authors"]}}


def report(r):
    m = r["model"]
    return "\n".join([
        f"input pipeline: {r['dataset']}, transforms {r['transforms']}, {r['image_size']}px, batch {r['batch']}, "
        f"{r['steps']} timed steps ({r['images']} images)",
        "",
        "| measured on this machine | images/s |",
        "| --- | --- |",
        f"| authors' Compose over PIL, per core | {r['per_core']['authors']:.0f} |",
        f"| ours, data worker (decode, draw, collate), per core | {r['per_core']['ours']:.0f} "
        f"({r['speedup_per_core']:.2f}x) |",
        f"| ours, device work (crop, resize, flip, jitter, normalise) on {r['device']} | "
        f"{r['device_images_per_s']:.0f} ({r['device_ms_per_batch']:.1f} ms a batch) |",
        f"| ours, in all: {r['workers']} workers into {r['device']} | {r['in_all']:.0f} |",
        "",
        "main thread per step, batches prefetched, model a no-op: "
        + ("not measured (0 workers: the main thread decodes)" if r["host_ms_per_step"] is None else
           f"{r['host_ms_per_step']:.2f} ms (median; take the batch, queue its copy"
           f"{' and transform' if r['device'].startswith('cuda') else ''})"),
        "",
        f"model (not a measurement): {m['arch']} trains at {m['train_gflop_per_image']:.1f} GFLOP an image; an H200 "
        f"at 50% of {H200_TENSOR_FLOPS / 1e12:.0f} TFLOP/s bf16 takes {m['h200_images_per_s']:.0f} images/s: "
        f"{m['cores_ours']:.1f} cores of ours feed it, {m['cores_authors']:.1f} of the authors' Compose",
    ])
