"""Which implementation runs an attention shape on CUDA: the Triton kernels, or the SDPA
composite (PyTorch's `scaled_dot_product_attention` for `out`, on whatever backend PyTorch picks
there: cuDNN, FlashAttention or memory-efficient; the probe rows as one small fp32 product; `dv`
a view), so that the library is never the slower of the two.

- `ALIGNCLIP_ATTENTION=auto` (the default) times forward + backward of both (out, dv and the
  probe rows, all with gradients) on the first shape of each key and keeps the faster. A key is
  (N bucket, D, dtype, rows > 0, device name, torch and Triton versions): the shapes the tiles
  are autotuned for. The choice is kept in this process, written to a JSON file beside Triton's
  cache (`attention_choices.json` in an `alignclip` folder next to TRITON_CACHE_DIR, default
  ~/.triton/alignclip/) and read from there by later processes; each key's choice is logged
  once (logger `alignclip_kernels`) and listed by `attention_choices()`.
- `triton` or `sdpa` forces that path (`sdpa` is the PyTorch path: the same function the CPU runs).
- Deterministic mode (`deterministic=True`, or `torch.use_deterministic_algorithms`): a fixed
  rule, no timing: the Triton kernels, whose deterministic mode issues no float atomic and runs
  the static tiles (no autotuning), so two machines with the same GPU model and library versions
  compute the same bits. SDPA's fused backwards make no such promise.
- Under `torch.compile` the choice is made when the graph is built (timed then if the key is
  new, with real tensors of the traced shape) and holds for that graph.
- Off CUDA the question does not arise: the interpreter runs the kernels (the tests), the CPU
  the PyTorch path.
"""
import json
import logging
import os
import threading
import time

import torch

from ._runtime import next_pow2, on_device

PATHS = ("triton", "sdpa")
MODES = ("auto", *PATHS)
TIMED_DEVICES = {"cuda"}   # device types on which `auto` times the paths
log = logging.getLogger("alignclip_kernels")
_CHOICES = {}          # key -> {"path", "source", "triton_ms", "sdpa_ms"}
_LOCK = threading.Lock()


def mode():
    """`ALIGNCLIP_ATTENTION`, checked."""
    value = os.environ.get("ALIGNCLIP_ATTENTION", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"ALIGNCLIP_ATTENTION must be one of {', '.join(MODES)}, got {value!r}")
    return value


def _versions():
    import triton

    return f"torch {torch.__version__}, triton {triton.__version__}"


def _key(n, d, dtype, rows, device_name):
    return f"N<={next_pow2(n)} D={d} {str(dtype).split('.')[-1]} rows={'yes' if rows else 'no'} " \
           f"{device_name} ({_versions()})"


def cache_file():
    """The JSON file beside Triton's cache that keeps the timed choices across processes."""
    triton_cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(os.path.dirname(os.path.abspath(triton_cache)), "alignclip", "attention_choices.json")


def _read_cache():
    try:
        with open(cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key, entry):
    """Add one choice to the file (read, merge, write a temporary file, rename: other processes
    see the old file or the new one)."""
    path = cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        data[key] = {k: v for k, v in entry.items() if k != "source"}
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:   # a read-only home: the choice still holds for this process
        log.warning("alignclip: cannot keep the attention choice in %s (%s)", path, exc.strerror)


def attention_choices():
    """{key: {"path", "source" (timed, cache, forced or rule), "triton_ms", "sdpa_ms"}} of the
    keys this process has run on CUDA."""
    with _LOCK:
        return {key: dict(entry) for key, entry in _CHOICES.items()}


def _timed_ms(fn, device, repeats=5):
    """Median milliseconds of fn() after two warm-up calls (the first compiles and autotunes):
    CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def time_paths(b, h, n, d, dtype, rows, device):
    """{path: ms} of forward + backward of both paths on a packed projection of this shape."""
    from .attention import _packed_views, run_path

    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    grads = None

    def step(path):
        nonlocal grads
        q, k, v = _packed_views(qkv)
        outs = [o for o in run_path(path, q, k, v, rows, d ** -0.5, True) if o is not None]
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, [qkv], grads)

    with on_device(qkv):
        return {path: _timed_ms(lambda path=path: step(path), device) for path in PATHS}


def _decide(key, shape, dtype, rows, device):
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]["path"]
    cached = _read_cache().get(key)
    if cached and cached.get("path") in PATHS:
        entry = {**cached, "source": "cache"}
    else:
        ms = time_paths(*shape, dtype, rows, device)
        entry = {"path": min(PATHS, key=ms.get), "source": "timed", "triton_ms": ms["triton"], "sdpa_ms": ms["sdpa"]}
        _write_cache(key, entry)
    with _LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = entry
            timing = (f" (forward + backward: triton {entry['triton_ms']:.3f} ms, sdpa {entry['sdpa_ms']:.3f} ms)"
                      if "triton_ms" in entry else "")
            log.info("alignclip attention %s: %s, %s%s", key, entry["path"], entry["source"], timing)
        return _CHOICES[key]["path"]


def _constant_under_compile(fn):
    """`torch.compiler.assume_constant_result(fn)` without importing torch._dynamo (2 s of every
    program that never compiles): that decorator only sets this flag on `fn`, which
    tests/test_attention_choice.py checks it still does."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _decide_when_tracing(key, b, h, n, d, dtype_name, rows, device):
    """The choice for a graph being built: made (or read) now, a constant of the graph."""
    return _decide(key, (b, h, n, d), getattr(torch, dtype_name), rows, torch.device(device))


def _forced(key, path, source):
    with _LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = {"path": path, "source": source}
            log.info("alignclip attention %s: %s, %s", key, path, source)
    return path


def choose(q, rows, exact_order):
    """"triton" or "sdpa" for an attention call on q [B, H, N, D] that the kernels can run;
    see the module docstring."""
    forced = mode()
    b, h, n, d = (int(x) for x in q.shape)
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else str(q.device)
    key = _key(n, d, q.dtype, rows, name)
    if forced != "auto":
        return _forced(key, forced, "forced by ALIGNCLIP_ATTENTION")
    if exact_order:
        return _forced(key + " deterministic", "triton", "rule: deterministic mode")
    if q.device.type not in TIMED_DEVICES:
        return "triton"
    device = q.device if q.device.type != "cuda" or q.device.index is not None else \
        torch.device("cuda", torch.cuda.current_device())
    if torch.compiler.is_compiling():
        return _decide_when_tracing(key, b, h, n, d, str(q.dtype).split(".")[-1], rows, str(device))
    return _decide(key, (b, h, n, d), q.dtype, rows, device)
