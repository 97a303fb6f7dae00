"""pytest hooks only: Triton's interpreter on CUDA-less machines and the `gpu` marker.

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


def pytest_collection_modifyitems(config, items):
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
