"""Values the host reads a step late, so the training loop never waits for the device it feeds.

`push(tag, step, tensor)` queues a non-blocking copy of a small device tensor into pinned host
memory and records an event; `ready()` returns the entries older than the newest one, whose
copies finished long ago (reading them waits on their event, never on the stream), and
`flush()` returns all of them, waiting for the last. Neither synchronises the stream, so
`torch.cuda.set_sync_debug_mode("error")` holds over the loop. On the CPU a copy is immediate.
"""
from collections import deque
from typing import NamedTuple

import torch


class Read(NamedTuple):
    tag: str
    step: int
    values: list


class LaggedReads:
    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = deque()

    def push(self, tag, step, tensor):
        tensor = tensor.detach()
        if self.cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tensor.clone(), None
        self.pending.append((tag, step, host, event))

    def _take(self, keep):
        out = []
        while len(self.pending) > keep:
            tag, step, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            out.append(Read(tag, step, host.tolist()))
        return out

    def ready(self):
        """The entries pushed before the newest step's."""
        newest = self.pending[-1][1] if self.pending else None
        keep = sum(1 for entry in self.pending if entry[1] == newest)
        return self._take(keep)

    def flush(self):
        return self._take(0)
