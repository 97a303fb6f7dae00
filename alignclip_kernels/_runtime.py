"""Which implementation an op runs: compiled Triton, interpreted Triton, or PyTorch.

`TRITON_INTERPRET=1` must be set before triton is imported for the interpreter to run the
kernels on CPU tensors (tests/conftest.py does so when CUDA is absent).
"""
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # non-Linux installs have no triton wheel
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend(device=None) -> str:
    """Return "triton", "triton-interpreter" or "torch": the path ops take on `device`.

    `device` defaults to the current CUDA device when CUDA is available, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if not HAS_TRITON:
        return "torch"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    return "torch"


def runs_triton(tensor: torch.Tensor) -> bool:
    return backend(tensor.device) != "torch"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly ("ieee"), never silently as TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"
