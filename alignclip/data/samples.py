"""Image samples, image folders and the step-indexed batch order.

The order of training batches is a pure function of (seed, domain, step): each domain's stream
is a concatenation of seeded permutations, and step t takes items [t·bs, (t+1)·bs). Each item's
augmentation is seeded from (seed, domain, step, position). A run resumed at step k therefore
sees exactly the batches an unbroken run would, with no sampler state to save; a rank of a
distributed run takes every world-th item of each batch.
"""
import hashlib
import os
from typing import NamedTuple

import torch

# torchvision's ImageFolder extensions, compared case-insensitively as it does
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Sample(NamedTuple):
    path: str
    label: int


def seed_hash(*parts):
    """A 31-bit seed from any parts, stable across runs and processes (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class StepBatches(torch.utils.data.Sampler):
    """Batches of (index, augmentation seed) for steps start..stop-1 of one domain; see module doc."""

    def __init__(self, size, batch_size, seed, domain, start, stop, rank=0, world=1):
        if size < 1:
            raise ValueError(f"domain {domain} has no training images")
        self.size, self.batch_size, self.seed, self.domain = size, batch_size, seed, domain
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._perms = {}

    def _item(self, position):
        epoch, offset = divmod(position, self.size)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(seed_hash(self.seed, self.domain, epoch))
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return int(self._perms[epoch][offset])

    def batch(self, step):
        first = step * self.batch_size
        return [(self._item(first + j), seed_hash(self.seed, self.domain, step, j))
                for j in range(self.rank, self.batch_size, self.world)]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)

    def __len__(self):
        return self.stop - self.start


def list_images(folder):
    """Image files under `folder`, recursively, in torchvision ImageFolder's order; hidden
    folders and files (`.ipynb_checkpoints`) are skipped."""
    found = []
    for root, _, files in sorted(os.walk(folder, followlinks=True)):
        if any(part.startswith(".") for part in os.path.relpath(root, folder).split(os.sep) if part != "."):
            continue
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found
