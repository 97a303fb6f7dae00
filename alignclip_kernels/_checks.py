"""Argument checks at the public boundary: every failure names the argument and what was expected."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name, x, ndim, shape_doc, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {ndim}), got {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}")
    return x


def labels(name, y, batch, num_classes):
    """Type and shape always; the value range only where it costs no device sync (CPU labels,
    outside torch.compile's tracing, which cannot branch on values).

    On a GPU the kernels clamp every label they read and turn an out-of-range one into NaN
    results, so a bad label cannot pass silently; the trainer checks each batch on the host
    before it moves to the device.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor of shape [B]={batch}, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64) of shape [B], got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B]=[{batch}], got {tuple(y.shape)}")
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        label_range(name, y, num_classes)
    return y


def label_range(name, y, num_classes):
    """Refuse class indices outside [0, num_classes) (reads the values: call it on host tensors)."""
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must hold class indices in [0, {num_classes}), got values in "
                         f"[{low}, {high}]")


def size(name, actual, expected, what):
    if actual != expected:
        raise ValueError(f"{name}: {what} must be {expected}, got {actual}")


def same_device(**tensors):
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")


def same_device_dtype(**tensors):
    same_device(**tensors)
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "all floating inputs must share one dtype")


def positive_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def flag(name, value):
    """A switch: True or False only (a string such as "false" would read as on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value
