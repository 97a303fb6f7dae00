"""Which implementation an op runs: compiled Triton, interpreted Triton, or PyTorch.

`TRITON_INTERPRET=1` must be set before triton is imported for the interpreter to run the
kernels on CPU tensors (tests/conftest.py does so when CUDA is absent).
"""
import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # non-Linux installs have no triton wheel
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TARGET_ARCH = None


@contextlib.contextmanager
def target_arch(major):
    """Pretend to launch for a CUDA compute capability `major` (9 Hopper, 8 Ampere) so that
    `inspect` can record the launches the dispatcher would make there, on meta tensors."""
    global _TARGET_ARCH
    previous, _TARGET_ARCH = _TARGET_ARCH, major
    try:
        yield
    finally:
        _TARGET_ARCH = previous


def cuda_arch(device):
    """Compute capability major that picks launch configurations; None means the interpreter's
    single small configuration."""
    if _TARGET_ARCH is not None:
        return _TARGET_ARCH
    if device.type == "cuda" and not interpreter_enabled():
        return torch.cuda.get_device_capability(device)[0]
    return None


def backend(device=None) -> str:
    """Return "triton", "triton-interpreter" or "torch": the path ops take on `device`.

    `device` defaults to the current CUDA device when CUDA is available, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if _TARGET_ARCH is not None:
        return "triton"
    if not HAS_TRITON:
        return "torch"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    return "torch"


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` runs its Triton kernels. float64 inputs (the oracle's dtype) take
    the PyTorch path on every backend, so they keep float64 results everywhere."""
    return backend(tensor.device) != "torch" and tensor.dtype != torch.float64


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(tensor: torch.Tensor) -> str:
    """Precision of `tl.dot` on fp32 operands, never plain TF32: exact ("ieee") under the
    interpreter; on a GPU three-pass TF32 ("tf32x3", near-fp32 accuracy on tensor cores), since
    exact FMA dots spill whole tiles out of registers (ptxas, see `inspect`). 16-bit operands
    ignore it."""
    if tensor.dtype != torch.float32 or cuda_arch(tensor.device) is None:
        return "ieee"
    return "tf32x3"
