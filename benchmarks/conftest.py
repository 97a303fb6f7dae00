"""Benchmark harness: one `measure` that times a provider, records its roofline bytes/FLOPs,
peak memory and (on CUDA) achieved TB/s and TFLOP/s in `extra_info`.

Triton providers run only on CUDA; interpreted kernels are never timed. Without CUDA the
PyTorch providers run at reduced shapes so that the suite finishes in minutes on 2 cores.
"""
import os

os.environ["TRITON_INTERPRET"] = "0"   # before triton is imported: never time the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import alignclip_kernels as ak  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)"
NO_TRITON = "Triton providers need CUDA: interpreted kernels are not timed"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def needs_cuda(provider):
    if provider in ("fused",) and not CUDA:
        pytest.skip(NO_TRITON)


def peak_bytes(fn):
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def measure(benchmark, fn, *, group, provider, cost=None, rounds=None, **info):
    """Time `fn` (synchronised) under `group`; `cost` is a roofline.Cost or None."""
    benchmark.group = group
    peak = peak_bytes(fn)

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=rounds or (25 if CUDA else 3), iterations=1,
                       warmup_rounds=3 if CUDA else 1)
    median = benchmark.stats.stats.median
    extra = {"provider": provider, "device": DEVICE_NAME, "backend": ak.backend(DEVICE),
             "peak_memory_bytes": peak, **info}
    if cost is not None:
        extra.update(bytes=cost.bytes, flops=cost.flops, bound_s=cost.bound_s())
        if CUDA:
            extra.update(tb_per_s=cost.bytes / median / 1e12, tflop_per_s=cost.flops / median / 1e12)
    benchmark.extra_info.update(extra)
