"""One process or a torchrun launch: the rank, the device, and averages across ranks."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import RunError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def mean(self, values):
        """The mean of a 1-d tensor of values over all ranks (identity for one process)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world
        return values


def setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name, ddp):
    """The torch.device of `train.device` (auto: CUDA when available), checked before any work."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"train.device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"train.device is {name} but CUDA is not available on this machine")
        index = device.index if device.index is not None else ddp.local_rank
        if index >= torch.cuda.device_count():
            raise RunError(f"train.device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise RunError(f"train.device {name!r}: only cpu and cuda are supported")
    return device
