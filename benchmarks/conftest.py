"""Benchmark harness: `measure` times a provider (synchronised) and records its roofline bytes and
FLOPs, peak memory and, on CUDA, kernel-only time from `triton.testing.do_bench` (and its
CUDA-graph variant where the run can be captured) with achieved TB/s and TFLOP/s.

Triton providers run only on CUDA; interpreted kernels are never timed. Without CUDA the
PyTorch providers run at reduced shapes so that the suite finishes in minutes on 2 cores.

`pytest benchmarks/ --benchmark-only`, as typed, times in one process: the project's addopts
ask xdist for `-n auto`, under which pytest-benchmark turns itself off (and refuses
--benchmark-only), and timings taken beside other workers would not be worth reading anyway.
Without --benchmark-json the results go to `RESULTS_JSON`, what `benchmarks/report.py` reads.
"""
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"   # before triton is imported: never time the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402

import alignclip_kernels as ak  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)"
NO_TRITON = "Triton providers need CUDA: interpreted kernels are not timed"
RESULTS_JSON = Path(".benchmarks") / "results.json"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Before xdist and pytest-benchmark read the options (this is an initial conftest)."""
    if not config.getoption("benchmark_only", False):
        return
    if hasattr(config.option, "numprocesses"):
        config.option.numprocesses, config.option.dist = 0, "no"
    if config.getoption("benchmark_json", None) is None:
        RESULTS_JSON.parent.mkdir(exist_ok=True)
        config.option.benchmark_json = RESULTS_JSON


def sync():
    if CUDA:
        torch.cuda.synchronize()


def needs_cuda(provider):
    if provider.startswith(("fused", "alignclip-fused")) and not CUDA:
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


def kernel_times(fn):
    """(do_bench ms, CUDA-graph do_bench ms or None) on CUDA."""
    import triton

    plain = triton.testing.do_bench(fn, warmup=25, rep=100)
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=100)
    except Exception:  # not capturable (host syncs, allocator): plain timing only
        graph = None
    return plain, graph


def measure(benchmark, fn, *, group, provider, cost=None, rounds=None, setup=None, device_timed=True, **info):
    """Time `fn` under `group`; `cost` is a roofline.Cost or None; `setup` runs untimed before
    each round; `device_timed=False` for host work (no kernel-only timing on CUDA)."""
    benchmark.group = group
    fn()                     # first call: compiles and, on CUDA, autotunes (not timed)
    if setup is not None:
        setup()
    peak = peak_bytes(fn)

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=rounds or (25 if CUDA else 3), iterations=1,
                       warmup_rounds=3 if CUDA else 1, setup=setup)
    extra = {"provider": provider, "device": DEVICE_NAME, "backend": ak.backend(DEVICE),
             "peak_memory_bytes": peak, "torch": torch.__version__, **info}
    if CUDA and device_timed:
        plain, graph = kernel_times(fn)
        extra.update(kernel_ms=plain, graph_ms=graph)
    if cost is not None:
        extra.update(bytes=cost.bytes, flops=cost.flops, bound_s=cost.bound_s())
        if CUDA:
            seconds = extra["kernel_ms"] / 1e3
            extra.update(tb_per_s=cost.bytes / seconds / 1e12, tflop_per_s=cost.flops / seconds / 1e12)
    benchmark.extra_info.update(extra)
