"""The input pipeline: data workers decode, crop and resize; the training device does the
per-pixel work.

A worker reads each image's bytes, draws its crop, flip and jitter parameters from a generator
seeded by the item (`preprocess.py`), decodes it as cheaply as the file allows and resizes the
crop to the output size (`host_transforms.py`), and collates a step's images into one uint8
[B, S, S, 3] tensor in shared memory, with a [B, PARAMS] parameter tensor and the labels. The
main thread only receives that batch (pinned by the loader's pin thread on CUDA), copies it to
the device without blocking and queues `DeviceTransform` (flip, jitter, normalisation: one or
two kernel launches, nothing allocated beyond the output batch).

Training uses one DataLoader for all source domains: `StepSampler` yields a step's items of
every domain (each domain's stream is `StepBatches`: a pure function of seed, domain and step),
so a resumed run sees the batches an unbroken run sees. Evaluation loaders are built once per
split and keep their workers (`persistent_workers`).

With `data.skip_corrupt`, an unreadable image is replaced by the next readable one of its
split, and the main process says so in one line per file (the file and what is wrong with it),
once per file however often it is read.
"""
import collections
import os
import queue
import sys
import threading
import time
from typing import List

import numpy as np
import torch

from .decode import CorruptImageError, decode, read_image
from .device_transforms import DeviceTransform
from .domainbed import DataError
from .host_transforms import resized_crop
from .preprocess import PARAMS, eval_params, preprocessing, train_params
from .samples import Sample, StepBatches


class ImageItems(torch.utils.data.Dataset):
    """Items are indices (evaluation) or (index, augmentation seed) pairs (training); each gives
    (uint8 [3, S, S] pixels of the output size, parameter vector, label, skipped files).

    With `skip_corrupt`, an unreadable image is replaced by the next readable one and named in
    `skipped` as (path, reason); otherwise it raises `CorruptImageError` naming the file.
    """

    def __init__(self, samples: List[Sample], kind, size, skip_corrupt=False):
        self.samples = list(samples)
        self.spec = preprocessing(kind)
        self.size = size
        self.skip_corrupt = skip_corrupt

    def __len__(self):
        return len(self.samples)

    def _one(self, sample, seed):
        image = read_image(sample.path)
        decoded = None if image.jpeg else decode(image)[0]   # a JPEG's size is in its header: decoded later,
        height, width = image.jpeg[:2] if image.jpeg else decoded.shape[1:]   # reduced if the crop allows
        if seed is None:
            params = eval_params(self.spec, self.size, height, width)
        else:
            params = train_params(self.spec, self.size, height, width, torch.Generator().manual_seed(seed))
        top, left, box_h, box_w, out_h, out_w, win_t, win_l = (int(v) for v in params[:8].tolist())
        pixels = resized_crop(image, (top, left, box_h, box_w), out_h, out_w, (win_t, win_l), self.size, decoded)
        return pixels, params

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        skipped = []
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            try:
                pixels, params = self._one(sample, seed)
                return pixels, params, sample.label, skipped
            except CorruptImageError as exc:
                if not self.skip_corrupt:
                    raise
                skipped.append((sample.path, getattr(exc, "reason", str(exc))))
        raise CorruptImageError(f"every image of this split is unreadable (first: {self.samples[0].path})")


def collate(items):
    """(uint8 [B, S, S, 3], float32 [B, PARAMS], int64 [B], skipped files); in a worker the image
    tensor is allocated in shared memory, so the batch crosses to the main process uncopied."""
    size = items[0][0].shape[-1] if items else 0
    images = torch.empty(len(items), size, size, 3, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        images.share_memory_()
    for k, (pixels, _, _, _) in enumerate(items):
        images[k].copy_(pixels.permute(1, 2, 0))
    params = torch.stack([p for _, p, _, _ in items]) if items else torch.empty(0, PARAMS)
    labels = torch.tensor([label for _, _, label, _ in items], dtype=torch.int64)
    return images, params, labels, [s for _, _, _, skipped in items for s in skipped]


_SAID = set()


def say_skipped(skipped, say=None):
    """One line per skipped file, the first time this process hears of it."""
    for path, reason in skipped:
        if path not in _SAID:
            _SAID.add(path)
            line = f"skipped {path}: {reason}"
            if say is None:
                print(line, file=sys.stderr, flush=True)
            else:
                say(line)


class StepSampler(torch.utils.data.Sampler):
    """Steps start..stop-1: each step's batch of every domain, domains in order, as one list of
    (index into the concatenated domains, augmentation seed)."""

    def __init__(self, sizes, batch_size, seed, start, stop, rank=0, world=1):
        self.streams = [StepBatches(n, batch_size, seed, d, start, stop, rank, world) for d, n in enumerate(sizes)]
        self.offsets = np.cumsum([0, *sizes[:-1]]).tolist()
        self.start, self.stop = start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield [(offset + i, s) for offset, stream in zip(self.offsets, self.streams) for i, s in stream.batch(step)]

    def __len__(self):
        return self.stop - self.start


def worker_count(requested):
    """data.num_workers, or (null) the cores this process may use, shared by the ranks torchrun
    started on this machine (LOCAL_WORLD_SIZE), less one for the main thread; at most 16."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(16, cores // max(local_world, 1) - 1))


def _loader(dataset, workers, device, **kw):
    extra = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, num_workers=workers, collate_fn=collate,
                                       pin_memory=device.type == "cuda", **extra, **kw)


def train_loader(domains, kind, size, *, batch_size, seed, start, stop, workers, device,
                 skip_corrupt=False, rank=0, world=1):
    items = ImageItems([s for d in domains for s in d], kind, size, skip_corrupt)
    sampler = StepSampler([len(d) for d in domains], batch_size, seed, start, stop, rank, world)
    return _loader(items, workers, device, batch_sampler=sampler)


def eval_loader(samples, kind, size, *, batch_size, workers, device, skip_corrupt=False):
    return _loader(ImageItems(samples, kind, size, skip_corrupt), workers, device, batch_size=batch_size)


def _received(loader, depth=3):
    """The loader's batches, received on a helper thread: what the loader's pin thread does on
    CUDA (attaching and later freeing each batch's shared memory, a few ms at B=108), kept off
    the main thread on the CPU too: the helper holds every batch it handed out until `depth`
    newer ones followed, so the last reference, and the unmapping, is dropped there. A worker's
    exception is re-raised here. A consumer that stops early (an error in the step) stops the
    helper, which lets go of the loader and so of its workers."""
    out = queue.Queue(maxsize=depth)
    done, stopped = object(), threading.Event()

    def hand(item):
        while not stopped.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def receive():
        handed = collections.deque()
        try:
            for batch in loader:
                if not hand(batch):
                    return
                handed.append(batch)
                if len(handed) > 2 * depth:
                    handed.popleft()
        except BaseException as exc:   # noqa: B036 -- handed to the consumer, which re-raises it
            hand(exc)
        hand(done)

    threading.Thread(target=receive, daemon=True).start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()


class DeviceBatches:
    """Iterates a loader's batches as (normalised images, labels) on `device`; `wait` adds up
    the seconds the main thread spent waiting for the workers; `say` takes the skipped-file
    lines (default: standard error)."""

    def __init__(self, loader, kind, size, device, num_classes=None, say=None):
        self.loader, self.device, self.num_classes, self.say = loader, device, num_classes, say
        self.transform = DeviceTransform(preprocessing(kind), device)
        self.wait = 0.0

    def moved(self):
        """(uint8 images, params, labels) copied to the device without blocking, untransformed."""
        off_thread = self.loader.num_workers > 0 and not self.loader.pin_memory
        batches = _received(self.loader) if off_thread else iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                images, params, labels, skipped = next(batches)
            except StopIteration:
                return
            self.wait += time.perf_counter() - started
            say_skipped(skipped, self.say)
            if self.num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"a training label lies outside [0, {self.num_classes})")
            yield (images.to(self.device, non_blocking=True), params.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def __iter__(self):
        for images, params, labels in self.moved():
            yield self.transform(images, params), labels


def load_images(samples, kind, size, device, skip_corrupt=False):
    """A few evaluation images as one normalised batch on `device` (the attention figure)."""
    items = ImageItems(samples, kind, size, skip_corrupt)
    images, params, _, skipped = collate([items[i] for i in range(len(items))])
    say_skipped(skipped)
    return DeviceTransform(preprocessing(kind), device)(images.to(device), params.to(device))
