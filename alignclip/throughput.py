"""`python -m alignclip pipeline --config F [--steps N] [--workers W]`: what the training input
pipeline costs on this machine, everything counted, beside the authors' plain torchvision
`Compose` over PIL (the configured transforms' own: with ColorJitter for `domainbed`) on the
same files with the same draws, and how many cores would feed an H200.

Measured, in one run, on one thread:
- host, per core: images per CPU-second of everything the host does for an image until the
  batch is handed to the device: read, decode, draw, crop and resize, collate (and, on CUDA,
  pin). The authors' = `Compose` per image plus stacking the batch. The two alternate batch
  by batch, so that both see the machine alike;
- device work per batch: the per-pixel work left to the training device (flip, jitter,
  normalisation): its kernel launches and copies, the bytes it moves, and its time (CUDA
  events on a GPU, CPU-seconds on a CPU);
- in all: on a CPU-only run, host plus device work per image, both on the CPU (what a CPU run
  pays); on a GPU, the host figure (the device work overlaps the model's);
- wall: images per second of wall time through the real DataLoader with W workers, copied to
  the device and transformed, as the training loop receives them;
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

from .checkpoint import RunError
from .clip import build_architecture
from .config import resolved_transforms
from .data import DeviceBatches, ImageItems, build_task, collate, preprocessing, reference_train, train_loader
from .data.decode import CorruptImageError, load_rgb
from .data.device_transforms import DeviceTransform
from .data.pipeline import StepSampler, say_skipped, worker_count
from .data.root import data_config
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


def authors_batch(reference, samples, batch, skip_corrupt):
    """The authors' `Compose` over a batch of (index, seed) items with the same draws as ours;
    with `skip_corrupt`, an unreadable image is replaced by the next readable one, as ours does."""
    out = []
    for index, seed in batch:
        for offset in range(len(samples)):
            try:
                image = load_rgb(samples[(index + offset) % len(samples)].path)
                break
            except CorruptImageError:
                if not skip_corrupt:
                    raise
        torch.manual_seed(seed)        # the same draws as ours, for the same crops
        out.append(reference(image))
    return torch.stack(out)


def measure(cfg, steps=20, workers=None):
    """The measurements of the module docstring, as a dict."""
    try:
        return _measure(cfg, steps, workers)
    except CorruptImageError as exc:
        raise RunError(CorruptImageError.one_line(exc)) from None


def _measure(cfg, steps, workers):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # per-core figures: one core's work
    try:
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
        pin = device.type == "cuda"

        def host(batch):
            images, params, labels, skipped = collate([items[i] for i in batch])
            say_skipped(skipped)
            return (images.pin_memory(), params.pin_memory(), labels.pin_memory()) if pin else (images, params, labels)

        ours_batches = [host(batches[0])]
        authors_batch(reference, samples, batches[0], cfg.data.skip_corrupt)
        images = sum(len(b) for b in batches[1:])
        ours_s = authors_s = 0.0
        for b in batches[1:]:      # side by side, batch after batch: both see the machine alike
            ours_s += _cpu_seconds(lambda b=b: ours_batches.append(host(b)))
            authors_s += _cpu_seconds(lambda b=b: authors_batch(reference, samples, b, cfg.data.skip_corrupt))

        transform = DeviceTransform(preprocessing(kind), device)
        moved = [(img.to(device), params.to(device)) for img, params, _ in ours_batches[1:]]
        transform(*moved[0])
        device_s = _device_seconds(lambda: [transform(*m) for m in moved], device)
        batch = len(batches[0])
        moved_bytes = batch * (3 * size * size * (1 + 4)) + sum(t.numel() * t.element_size()
                                                                  for t in ours_batches[1][1:])
    finally:
        torch.set_num_threads(threads)

    workers = worker_count(cfg.data.num_workers if workers is None else workers)

    def loader():
        return train_loader(task.train_domains, kind, size, batch_size=cfg.data.batch_size, seed=cfg.seed,
                            start=0, stop=steps, workers=workers, device=device, skip_corrupt=cfg.data.skip_corrupt)

    host_ms = None
    if workers > 0:
        prefetched = DeviceBatches(loader(), kind, size, device).moved()
        first = next(prefetched)
        time.sleep(0.5 + 1.5 * steps * batch / per_image_rate(images, ours_s) / workers)
        taken = []
        for _ in range(min(steps - 1, 3)):   # the helper thread holds three batches ahead
            started = time.perf_counter()
            img, params, labels = next(prefetched)
            if device.type == "cuda":
                transform(img, params)
            taken.append(time.perf_counter() - started)
        host_ms = 1e3 * sorted(taken)[len(taken) // 2]
        del prefetched, first
    stream = iter(DeviceBatches(loader(), kind, size, device))
    next(stream)
    started = time.perf_counter()
    for _ in stream:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    flops = training_flops(visual, cfg.model.dual_layers)
    h200 = 0.5 * H200_TENSOR_FLOPS / flops
    per_core = {"host": images / ours_s, "authors": images / authors_s}
    in_all = images / (ours_s + (device_s if device.type != "cuda" else 0.0))
    return {"dataset": cfg.data.dataset, "transforms": kind, "image_size": size, "steps": steps - 1,
            "batch": batch, "images": images, "per_core": per_core,
            "host_vs_authors": per_core["host"] / per_core["authors"],
            "device": str(device), "device_ms_per_batch": 1e3 * device_s / len(moved),
            "device_launches": transform.launches, "device_copies": 3, "device_bytes": moved_bytes,
            "in_all_per_core": in_all, "in_all_vs_authors": in_all / per_core["authors"],
            "host_ms_per_step": host_ms, "workers": workers, "wall_images_per_s": images / wall,
            "model": {"arch": cfg.model.arch, "train_gflop_per_image": flops / 1e9, "h200_images_per_s": h200,
                      "cores_ours": h200 / per_core["host"], "cores_authors": h200 / per_core["authors"]}}


def report(r):
    m = r["model"]
    cpu = not r["device"].startswith("cuda")
    return "\n".join([
        f"input pipeline: {r['dataset']}, transforms {r['transforms']}, {r['image_size']}px, batch {r['batch']}, "
        f"{r['steps']} timed steps ({r['images']} images), one thread",
        "",
        "| measured on this machine | images/s per core | vs the authors' Compose |",
        "| --- | --- | --- |",
        f"| authors' Compose over PIL (decode to normalised batch) | {r['per_core']['authors']:.0f} | 1.00x |",
        f"| ours, host: read, decode, draw, crop, resize, collate{'' if cpu else ', pin'} | "
        f"{r['per_core']['host']:.0f} | {r['host_vs_authors']:.2f}x |",
        (f"| ours, in all on this CPU: host + device work | {r['in_all_per_core']:.0f} | "
         f"{r['in_all_vs_authors']:.2f}x |" if cpu else
         "| ours, in all: the host figure (the device work runs on the GPU, beside the model) | "
         f"{r['per_core']['host']:.0f} | {r['host_vs_authors']:.2f}x |"),
        "",
        f"device work per batch of {r['batch']} on {r['device']} (flip, jitter, normalise): "
        f"{r['device_ms_per_batch']:.2f} ms ({'CPU time' if cpu else 'CUDA events'}), "
        f"{r['device_launches']} kernel launch{'es' if r['device_launches'] > 1 else ''} on CUDA "
        f"+ {r['device_copies']} copies, {r['device_bytes'] / 1e6:.1f} MB moved",
        f"wall: {r['workers']} workers into {r['device']}: {r['wall_images_per_s']:.0f} images/s",
        "main thread per step, batches prefetched, model a no-op: "
        + ("not measured (0 workers: the main thread decodes)" if r["host_ms_per_step"] is None else
           f"{r['host_ms_per_step']:.2f} ms (median; take the batch, queue its copy"
           f"{'' if cpu else ' and transform'})"),
        "",
        f"model (not a measurement): {m['arch']} trains at {m['train_gflop_per_image']:.1f} GFLOP an image; an H200 "
        f"at 50% of {H200_TENSOR_FLOPS / 1e12:.0f} TFLOP/s bf16 takes {m['h200_images_per_s']:.0f} images/s: "
        f"{m['cores_ours']:.1f} cores of our host work feed it, {m['cores_authors']:.1f} of the authors' Compose",
    ])
