"""Which implementation an op runs (compiled Triton, interpreted Triton or PyTorch) and the facts
about the target GPU that pick its launch configurations.

`TRITON_INTERPRET=1` must be set before triton is imported for the interpreter to run the
kernels on CPU tensors (the tests set it when CUDA is absent).
"""
import contextlib
import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # non-Linux installs have no triton wheel
    HAS_TRITON = False

# Multiprocessors of the GPU each target architecture stands for when nothing is launched on it
# (the work counter and the ptxas report): an H100/H200 SXM for sm_90, an A100 for sm_80.
TARGET_SMS = {9: 132, 8: 108}
# The interpreter pretends to a 4-SM GPU, so that small test batches still split each image's
# work over several programs and the tests exercise the cross-program combine.
INTERPRETER_SMS = 4


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """`ALIGNCLIP_AUTOTUNE=0` pins every kernel to its static default configuration."""
    return os.environ.get("ALIGNCLIP_AUTOTUNE", "1") != "0"


_TARGET_ARCH = None


@contextlib.contextmanager
def target_arch(major):
    """Pick launch configurations as on a CUDA GPU of compute capability `major` (9 Hopper,
    8 Ampere) whatever the tensors' device: the ptxas report and the work counter see the
    launches the dispatcher would make there."""
    global _TARGET_ARCH
    previous, _TARGET_ARCH = _TARGET_ARCH, major
    try:
        yield
    finally:
        _TARGET_ARCH = previous


_BATCH_FACTOR = 1.0


@contextlib.contextmanager
def counted_batch(factor):
    """Split work over programs as for a batch `factor` times the one launched: the work counter
    runs the paper's batch reduced and scales the counts, with the launch configuration of the
    full batch."""
    global _BATCH_FACTOR
    previous, _BATCH_FACTOR = _BATCH_FACTOR, float(factor)
    try:
        yield
    finally:
        _BATCH_FACTOR = previous


def batch_factor() -> float:
    return _BATCH_FACTOR


def cuda_arch(device):
    """Compute capability major that picks launch configurations; None means the interpreter's
    single small configuration."""
    if _TARGET_ARCH is not None:
        return _TARGET_ARCH
    if device.type == "cuda" and not interpreter_enabled():
        return torch.cuda.get_device_capability(device)[0]
    return None


@functools.lru_cache(maxsize=None)
def _device_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device) -> int:
    """Multiprocessors of the GPU the launch is for (a pretend count for targets and the interpreter)."""
    major = cuda_arch(device)
    if major is None:
        return INTERPRETER_SMS
    if _TARGET_ARCH is not None or device.type != "cuda":
        return TARGET_SMS.get(major, TARGET_SMS[8])
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


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
    if device.type not in ("cuda", "cpu"):
        return "torch"
    if interpreter_enabled():
        return "triton-interpreter"
    return "triton" if device.type == "cuda" else "torch"


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """Why this Triton's interpreter cannot run the kernels, or None.

    Before 3.7 the interpreter turns a loop bound into an index with int() of a one-element
    array, which NumPy 2.x refuses: every kernel with a loop then fails inside the interpreter.
    """
    import numpy as np
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return None
    try:
        int(np.array([1]))
    except TypeError:
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with NumPy "
                f"{np.__version__} (it converts loop bounds with int() of an array); use Triton >= 3.7 "
                f"for TRITON_INTERPRET=1, or unset it for the PyTorch path")
    return None


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` runs its Triton kernels.

    float64 inputs (the oracle's dtype) take the PyTorch path on every backend, so they keep
    float64 results. bfloat16 takes it under the interpreter, whose `tl.dot` multiplies the raw
    bf16 bit patterns as integers (an upstream bug: products off by orders of magnitude).
    """
    path = backend(tensor.device)
    if path == "torch" or tensor.dtype == torch.float64:
        return False
    if path == "triton-interpreter":
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"alignclip_kernels: {problem}")
        return tensor.dtype != torch.bfloat16
    return True


def loss_pytorch_path(oracle, first, *args, **kwargs):
    """A loss's PyTorch path: the oracle in the inputs' own dtypes, as the kernels compute it.

    The Triton losses are custom ops, which autocast leaves alone; without this, autocast would
    run the oracle's matmuls in bf16 (the SLS logits are scaled by 100) and the two paths would
    differ.
    """
    with torch.autocast(first.device.type, enabled=False):
        return oracle(first, *args, **kwargs)


def deterministic_flag(flag=None) -> bool:
    """Whether an op avoids float atomics: `flag` when given, else
    `torch.use_deterministic_algorithms`' setting. Deterministic launches write per-program
    partial results and combine them in a fixed order (see each op's docstring): bitwise the
    same from run to run, at the extra cost the work counter reports."""
    if flag is None:
        return torch.are_deterministic_algorithms_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic must be None or a bool, got {type(flag).__name__}")
    return flag


def on_device(tensor):
    """The CUDA device guard of `tensor`'s device: Triton launches on the current device, so a
    launch for tensors on cuda:1 while cuda:0 is current would fault without it."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(tensor: torch.Tensor) -> str:
    """Precision of `tl.dot` on fp32 operands, never plain TF32: exact ("ieee") under the
    interpreter; on a GPU three-pass TF32 ("tf32x3", near-fp32 accuracy on tensor cores), since
    exact FMA dots spill whole tiles out of registers (see the ptxas report). 16-bit operands
    ignore it."""
    if tensor.dtype != torch.float32 or cuda_arch(tensor.device) is None:
        return "ieee"
    return "tf32x3"
