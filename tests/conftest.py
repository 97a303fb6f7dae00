"""pytest hooks only: Triton's interpreter on CUDA-less machines, the `gpu` marker, the modules'
order.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection.
Shared helpers live in tests/utils.py.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

# The modules that take longest on 2 cores, first: xdist hands whole modules (--dist loadfile) to
# its workers in collection order, so a long module collected last would run alone at the end.
SLOW_FIRST = ("test_sweep.py", "test_work.py", "test_ptxas_report.py", "test_train.py",
              "test_checkpoint_writer.py", "test_attention.py", "test_benchmarks.py", "test_paper_tables.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def launches():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("launch counting runs under the Triton interpreter")
    from utils import LaunchCounter

    return LaunchCounter


@pytest.fixture
def torch_path(monkeypatch):
    """Run the ops' PyTorch path (the interpreter is exercised by the kernel tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
