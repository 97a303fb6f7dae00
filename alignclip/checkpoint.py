"""Checkpoints: written atomically (a run killed while writing leaves the previous file loadable),
read with `torch.load(weights_only=True)`, every failure a one-line `RunError`."""
import errno
import os

import torch

FORMAT = 2   # bumped when the checkpoint's keys change


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line for the user."""


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`. The
    file is named to torch.save, so its C++ writer writes it without calling back into Python
    (a background writer then holds the GIL only to pickle the tree)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        torch.save(obj, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(folder)            # the rename itself reaches the disk
    except OSError as exc:
        reason = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror
        raise RunError(f"cannot write {path}: {reason}; the previous file, if any, is kept") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_file(path):
    """`path`, or for a run folder (or its checkpoints folder) the last.pt it holds."""
    if not os.path.isdir(path):
        return path
    for candidate in (os.path.join(path, "checkpoints", "last.pt"), os.path.join(path, "last.pt")):
        if os.path.isfile(candidate):
            return candidate
    raise RunError(f"checkpoint {path} is a folder holding no checkpoints/last.pt")


def load(path, map_location="cpu", required=("step", "config", "visual")):
    """A checkpoint's dict, or a RunError saying what is wrong with the file."""
    if os.path.isdir(path):
        raise RunError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path}/checkpoints/last.pt)")
    if not os.path.exists(path):
        raise RunError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated file, another format, or not a checkpoint at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"checkpoint {path} cannot be read (truncated, or not a checkpoint): "
                       f"{first[:200]}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"checkpoint {path} is not an AlignCLIP run checkpoint (lacks {', '.join(missing)})")
    return state


def load_weights(module, weights, path, what):
    """`module.load_state_dict(weights)`, refusing weights of another architecture in one line."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc).splitlines()[0]
        raise RunError(f"checkpoint {path}: its {what} weights are for another architecture than "
                       f"this configuration's ({detail.strip()[:200]})") from None


def rng_state():
    """The torch RNG states (data order and augmentation are pure functions of the step)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
