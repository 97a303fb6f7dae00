"""Checkpoints written off the training loop's back.

`save(state, path)` copies every tensor of `state` into host buffers kept from one save to the
next (on CUDA: pinned buffers, copied without blocking on the current stream, so the loop does
not even wait for the copy; on the CPU: a memory copy, since training goes on changing the
live tensors), then hands the copy to one background thread, which writes it atomically
(`checkpoint.save_atomic`: temporary file, fsync, rename). One save is in flight at a time: the
next waits only if the last has not finished. `wait()` returns when nothing is in flight and
re-raises the writer's error, if any; a run calls it before it ends, stops or reports an error.

The first save of a state allocates its buffers (page faults cost more than the copy itself),
so `prepare(state)` allocates and touches them on the writer thread ahead of time.

`Schedule` says when a periodic checkpoint is due: every `train.checkpoint_every` steps, and
every `train.checkpoint_minutes` of wall time when set.
"""
import contextlib
import threading
import time

import torch

from .checkpoint import save_atomic


def _tensors(obj, prefix=()):
    """(path in the tree, tensor) of every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, (*prefix, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, (*prefix, i))


def _replaced(obj, copies, prefix=()):
    """`obj` with every tensor replaced by its copy in `copies` (keyed by path)."""
    if isinstance(obj, torch.Tensor):
        return copies[prefix]
    if isinstance(obj, dict):
        return {key: _replaced(value, copies, (*prefix, key)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_replaced(value, copies, (*prefix, i)) for i, value in enumerate(obj)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


class CheckpointWriter:
    def __init__(self):
        self._thread = None
        self._error = None
        self._buffers = {}       # (path, tree path) -> host tensor

    def _buffer(self, key, tensor):
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            pin = tensor.device.type == "cuda"
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def _start(self, target, *args):
        def run():
            try:
                target(*args)
            except BaseException as exc:   # noqa: B036 -- handed to the caller by wait()
                self._error = exc
        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def prepare(self, state, path):
        """Allocate (and touch) the buffers a save of `state` to `path` will copy into, on the
        writer thread."""
        self.wait()
        todo = [(key, t) for key, t in ((( path, tp), t) for tp, t in _tensors(state))
                if key not in self._buffers]

        def allocate():
            for key, tensor in todo:
                self._buffer(key, tensor).zero_()
        self._start(allocate)

    def save(self, state, path):
        """Copy `state` and write it to `path` in the background (after any save in flight)."""
        self.wait()
        copies, on_cuda = {}, False
        for tree_path, tensor in _tensors(state):
            tensor = tensor.detach()
            buf = self._buffer((path, tree_path), tensor)
            on_cuda |= tensor.device.type == "cuda"
            buf.copy_(tensor, non_blocking=tensor.device.type == "cuda")
            copies[tree_path] = buf
        done = None
        if on_cuda:
            done = torch.cuda.Event()
            done.record()
        snapshot = _replaced(state, copies)

        def write():
            if done is not None:
                done.synchronize()
            save_atomic(snapshot, path)
        self._start(write)

    def wait(self):
        """Block until no save is in flight; re-raise the last save's error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()


@contextlib.contextmanager
def background_writer():
    """A `CheckpointWriter` that is waited for when the block ends: normally (re-raising a
    failed write), or with an error (the block's error is the one reported; the write in flight
    still completes, so the last checkpoint on disk is whole)."""
    writer = CheckpointWriter()
    try:
        yield writer
    except BaseException:
        try:
            writer.wait()
        except Exception:   # noqa: BLE001 -- the block's own error is reported, not the writer's
            pass
        raise
    writer.wait()


class Schedule:
    """When a periodic checkpoint is due: every `every` steps and, with `minutes`, whenever that
    much time has passed since the last one."""

    def __init__(self, every, minutes=None):
        self.every, self.seconds = every, None if minutes is None else 60.0 * minutes
        self.last = time.monotonic()

    def due(self, step, stop):
        if step >= stop:
            return False
        return step % self.every == 0 or (self.seconds is not None and time.monotonic() - self.last >= self.seconds)

    def saved(self):
        self.last = time.monotonic()
