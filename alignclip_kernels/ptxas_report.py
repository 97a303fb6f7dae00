"""Static GPU report without a GPU: `python -m alignclip_kernels.ptxas_report [--json FILE]`.

For the paper's shapes (attention at ViT-B/32, B/16, L/14, H/14; the losses at B=108, P=196,
E=512, K in {7, 65, 345}, L=5, H=12; the input pipeline's pixel transform of 108 images at
224x224) and fp32/fp16/bf16, every op is run forward and backward
on meta tensors with the dispatcher told to target sm_90 or sm_80, once with its static default
configuration and once per autotune candidate (the attention kernels); each kernel launch it
would make is recorded instead of run. Each distinct launch (kernel, constexprs, warps, stages and
Triton's own argument specialisation) is compiled with `triton.compile` for
GPUTarget("cuda", 90|80, 32); the verbose log of the ptxas run Triton itself makes (its bundled
ptxas with its own flags, sm_90a / sm_80) gives registers and spills. Shared memory is Triton's
dynamic allocation plus ptxas's static count. Resident warps per SM follow from registers, shared
memory and warps against the chip's limits. On sm_90a a row says whether its 16-bit `tl.dot`s lowered to `wgmma`.

Exit status 1 when any configuration the dispatcher or the autotuner can pick spills, exceeds
shared memory (227 KB sm_90, 163 KB sm_80) or fails to compile. Must run without
TRITON_INTERPRET (it re-executes itself without it when set).
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from .paper import LABEL_EPSILON, LOGIT_SCALE, MARGIN_ALPHA

PAPER_SLS = (MARGIN_ALPHA, LOGIT_SCALE, LABEL_EPSILON)   # the SLS op's alpha, scale, epsilon
ARCHS = {"sm_90a": 9, "sm_80": 8}
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}      # per block, opt-in maximum
SMEM_PER_SM = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

ATTENTION_SHAPES = {  # name: (B, H, N, D); D below a power of two runs padded to it
    "ViT-B/32": (108, 12, 50, 64),
    "ViT-B/16": (108, 12, 197, 64),
    "ViT-L/14": (108, 16, 257, 64),
    "ViT-H/14": (108, 16, 257, 80),
    "ViT-g/14": (108, 16, 257, 88),
    "ViT-bigG/14": (108, 16, 257, 104),
    "D=256": (108, 4, 257, 256),
}
DETERMINISTIC_SHAPES = ("ViT-B/16", "ViT-H/14", "ViT-g/14", "D=256")
DETERMINISTIC_CLASS_COUNTS = (7, 345)
LOSS_SHAPE = dict(B=108, P=196, E=512, L=5, H=12)
CLASS_COUNTS = (7, 65, 345)
FLAGS = ("HAS_ROWS", "WRITE_DV", "HAS_DROW", "HAS_DDV", "TEXT_GRAD", "CD_GRAD", "TARGET_GRAD",
         "FROM_TOKENS", "SPLIT", "DQ_ATOMIC", "EXACT_ORDER", "FLIP", "JITTER")


@dataclass
class Launch:
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    cases: list = field(default_factory=list)
    default: bool = False


def _record_launches(run_op):
    """Run `run_op()` with every JIT kernel launch recorded and skipped."""
    from triton.runtime.jit import JITFunction

    recorded = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self, args, kwargs))

    JITFunction.run = record
    try:
        run_op()
    finally:
        JITFunction.run = original
    return recorded


def _attention_run(b, h, n, d, dtype, fwd_config=None, bwd_config=None, d_rows=True, exact_order=False):
    """Forward and backward of the attention launchers on meta tensors (packed q/k/v, the CLS
    row, d(dv), and d(CLS row) unless `d_rows` is False; `exact_order`: the deterministic mode)."""
    import torch

    from . import attention

    meta = dict(device="meta", dtype=dtype)
    qkv = torch.empty(b, n, 3, h, d, **meta)
    q, k, v = attention._packed_views(qkv)
    out, lse, rows = attention._attention_fwd(q, k, v, 1, d ** -0.5, None, fwd_config)
    dq, dk, dv = attention._packed_views(torch.empty_like(qkv))
    attention._attention_bwd(torch.empty_like(out), torch.empty_like(out),
                             torch.empty_like(rows) if d_rows else None, q, k, v, out, lse, rows, 1,
                             d ** -0.5, dq, dk, dv, bwd_config, exact_order)


def _loss_run(k, dtype, exact_order=False):
    """Forward and backward of every loss launcher on meta tensors (d(text) included;
    `exact_order`: the deterministic mode)."""
    import torch

    from . import aal, similarity_align, sls_mms
    from .token_text_target import _target_bwd, _target_fwd

    b, p, e, n_layers, h = (LOSS_SHAPE[key] for key in ("B", "P", "E", "L", "H"))
    meta = dict(device="meta", dtype=dtype)
    f32 = dict(device="meta", dtype=torch.float32)
    tokens, tokens_dv = torch.empty(b, p, e, **meta), torch.empty(b, p, e, **meta)
    text = torch.empty(k, e, **meta)
    labels = torch.empty(b, dtype=torch.int64, device="meta")
    one = torch.empty((), **f32)
    exact = exact_order
    g, row_stats = _target_fwd(tokens_dv, text, labels, 1.0)
    _target_bwd(torch.empty_like(g), tokens_dv, text, labels, g, row_stats, 1.0, True, exact)
    cls = torch.empty(n_layers, b, h, p + 1, **f32)
    state = aal._aal_fwd(cls, None, tokens_dv, text, labels, 1.0, exact)
    aal._aal_bwd(one, cls, None, tokens_dv, text, labels, 1.0, *state[1:], False, True, exact)
    state = aal._aal_fwd(cls, g, None, None, None, 1.0, exact)
    aal._aal_bwd(one, cls, g, None, None, None, 1.0, *state[1:], True, False, exact)
    _, stats, inv_nt = similarity_align._sim_fwd(tokens, tokens_dv, text, exact)
    for text_grad in (False, True):
        similarity_align._sim_bwd(one, tokens, tokens_dv, text, stats, inv_nt, text_grad, exact)
    feats = torch.empty(b, e, **f32)
    dist = torch.empty(k, k, **f32)
    _, logits, lse, target_sum = sls_mms._sls_fwd(feats, text.float(), labels, dist, *PAPER_SLS, exact)
    sls_mms._sls_bwd(one, logits, feats, text.float(), labels, dist, logits, lse, target_sum,
                     *PAPER_SLS, True, True, exact)


def _pixel_run():
    """The input pipeline's per-pixel transform of a training batch, with and without jitter."""
    import torch

    from . import pixels

    b, size = LOSS_SHAPE["B"], 224
    images = torch.empty(b, size, size, 3, dtype=torch.uint8, device="meta")
    mean = torch.empty(3, device="meta")
    flip = torch.empty(b, device="meta")
    for jitter in (None, torch.empty(b, pixels.JITTER_COLUMNS, device="meta")):
        pixels._pixels_fwd(images, mean, mean, flip, jitter)


def _op_runs(dtype, arch):
    """(case name, callable running forward and backward on meta tensors, is the default)."""
    import torch

    from . import attention

    runs = []
    for name, (b, h, n, d) in ATTENTION_SHAPES.items():
        if dtype == torch.float32 and d > attention.FP32_MAX_HEAD_DIM:
            continue   # the PyTorch path
        for d_rows in (True, False):
            runs.append((f"attention {name}" + ("" if d_rows else " no d(rows)"),
                         lambda b=b, h=h, n=n, d=d, d_rows=d_rows: _attention_run(
                             b, h, n, d, dtype, d_rows=d_rows), True))
        with _target(arch):
            candidates = attention.autotune_candidates(d, dtype, torch.device("meta"))
        for i in range(max(len(candidates["fwd"]), len(candidates["bwd"]))):
            fwd = candidates["fwd"][min(i, len(candidates["fwd"]) - 1)]
            bwd = candidates["bwd"][min(i, len(candidates["bwd"]) - 1)]
            runs.append((f"attention {name} autotune #{i}",
                         lambda b=b, h=h, n=n, d=d, fwd=fwd, bwd=bwd: _attention_run(
                             b, h, n, d, dtype, fwd, bwd), False))
        if name in DETERMINISTIC_SHAPES:
            runs.append((f"attention {name} deterministic",
                         lambda b=b, h=h, n=n, d=d: _attention_run(b, h, n, d, dtype, exact_order=True), True))
    for k in CLASS_COUNTS:
        runs.append((f"losses K={k}", lambda k=k: _loss_run(k, dtype), True))
    for k in DETERMINISTIC_CLASS_COUNTS:
        runs.append((f"losses K={k} deterministic", lambda k=k: _loss_run(k, dtype, True), True))
    runs.append(("pixel transform", _pixel_run, True))
    return runs


def _target(arch):
    from ._runtime import target_arch

    return target_arch(ARCHS[arch])


def _specialise(fn, args, kwargs):
    """Triton's own launch-time specialisation: signature, constexprs and divisibility attrs."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(fn.arg_names, args))
    bound.update({key: val for key, val in kwargs.items() if key in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = spec
            continue
        signature[param.name] = ty
        if spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _config_label(fn, kwargs, signature):
    blocks = " ".join(f"{key}={val}" for key, val in kwargs.items()
                      if key.startswith(("BLOCK", "TAIL", "E_PAD")) or key in FLAGS)
    dtypes = sorted({ty[1:] for ty in signature.values() if ty.startswith("*")} - {"i64", "i32"})
    return (f"{blocks} warps={kwargs.get('num_warps', 4)} stages={kwargs.get('num_stages', 3)} "
            f"ptr={'/'.join(dtypes)}")


def _compile_with_ptxas_log(source, arch, options):
    """`triton.compile` for `arch`, with the log of the ptxas run Triton itself makes (its own
    flags: ptxas 12.9 spills at low register counts without Triton 3.8's
    `--regAllocOptLevel=2`), never served from Triton's cache."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch] * 10, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return compiled, log.getvalue()


def _ptxas_stats(log):
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    if "Used" not in log:
        raise RuntimeError("Triton printed no ptxas log")
    return dict(registers=grab(r"Used (\d+) registers"),
                spill_bytes=grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
                static_smem=grab(r"(\d+) bytes smem"))


def warps_per_sm(registers, shared_bytes, num_warps, arch):
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // num_warps,
              REGS_PER_SM // (regs_per_warp * num_warps)]
    if shared_bytes:
        limits.append(SMEM_PER_SM[arch] // (shared_bytes + 1024))
    return max(0, min(limits)) * num_warps


def _compile_job(launch, arch):
    """What a worker process needs to compile one launch: picklable, the kernel by module and name."""
    signature, constexprs, attrs = _specialise(launch.fn, launch.args, launch.kwargs)
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs}
    return dict(module=launch.fn.fn.__module__, name=launch.fn.fn.__name__, signature=signature,
                constexprs=constexprs, attrs=attrs, options=options, arch=arch,
                row=dict(kernel=launch.kernel, config=_config_label(launch.fn, launch.kwargs, signature),
                         arch=arch, default=launch.default, cases=launch.cases, registers=None,
                         spill_bytes=None, shared_bytes=None, warps_per_sm=None, wgmma=None, error=None))


def _compile_row(job):
    import importlib

    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    arch, options, row = job["arch"], job["options"], dict(job["row"])
    try:
        compiled, log = _compile_with_ptxas_log(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                                arch, options)
        ptx = compiled.asm["ptx"]
        stats = _ptxas_stats(log)
    except Exception as exc:  # a failed compile is a finding, reported and fatal for defaults
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    shared = int(compiled.metadata.shared) + stats["static_smem"]
    num_warps = options.get("num_warps", 4)
    has_dot = "mma" in ptx
    row.update(registers=stats["registers"], spill_bytes=stats["spill_bytes"], shared_bytes=shared,
               warps_per_sm=warps_per_sm(stats["registers"], shared, num_warps, arch),
               wgmma=("wgmma.mma_async" in ptx) if (arch == "sm_90a" and has_dot) else None)
    return row


SAMPLE_KEY = ("attention ViT-B/16 autotune", "bfloat16", "sm_90a")   # the autotune key --sample compiles whole


def _sampled(launches, arch):
    """The --sample subset: each kernel's first default launch per dtype (the launch's pointer
    types), and every launch of one autotune key's candidates."""
    kept, seen = [], set()
    for launch in launches:
        dtype_label = launch.cases[0].rsplit(" ", 1)[1]
        first = (launch.kernel, dtype_label)
        candidate = arch == SAMPLE_KEY[2] and any(case.startswith(SAMPLE_KEY[0]) and case.endswith(SAMPLE_KEY[1])
                                                  for case in launch.cases)
        if candidate or (launch.default and first not in seen):
            kept.append(launch)
            seen.add(first)
    return kept


def collect(archs=tuple(ARCHS), dtypes=("float32", "float16", "bfloat16"), progress=None, jobs=None, sample=False):
    """Report rows, one per distinct kernel launch × arch (`default`: the static configuration
    picks it; otherwise it is an autotune candidate only), compiled by `jobs` processes (default:
    one per core). `sample`: every kernel once per dtype and arch, and one autotune key's
    candidates (what the test suite compiles; the full report is committed)."""
    import concurrent.futures
    import multiprocessing

    import torch

    compile_jobs = []
    for arch in archs:
        launches = {}
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for case, run, default in _op_runs(dtype, arch):
                with _target(arch):
                    recorded = _record_launches(run)
                for fn, args, kwargs in recorded:
                    sig = _specialise(fn, args, kwargs)
                    key = (fn.__name__, repr(sig), repr(sorted(kwargs.items(), key=str)))
                    if key not in launches:
                        launches[key] = Launch(fn.__name__, fn, args, kwargs)
                    launch = launches[key]
                    launch.default = launch.default or default
                    label = f"{case} {dtype_name}"
                    if label not in launch.cases:
                        launch.cases.append(label)
        chosen = _sampled(launches.values(), arch) if sample else launches.values()
        compile_jobs += [_compile_job(launch, arch) for launch in chosen]
    rows = []
    workers = jobs or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(_compile_row, compile_jobs):
            if progress:
                progress(row)
            rows.append(row)
    return rows


def failures(rows):
    bad = []
    for row in rows:
        if row["error"]:
            bad.append(f"{row['kernel']} [{row['config']}] on {row['arch']}: {row['error']}")
        elif row["spill_bytes"]:
            bad.append(f"{row['kernel']} [{row['config']}] on {row['arch']} spills {row['spill_bytes']} bytes")
        elif row["shared_bytes"] > SMEM_LIMIT[row["arch"]]:
            bad.append(f"{row['kernel']} [{row['config']}] on {row['arch']} needs {row['shared_bytes']} B shared")
    return bad


def _format_row(row):
    if row["error"]:
        return f"{row['kernel']:<30} {row['arch']:<7} FAILED {row['error']}"
    wgmma = "-" if row["wgmma"] is None else ("yes" if row["wgmma"] else "no")
    return (f"{row['kernel']:<30} {row['arch']:<7} {row['registers']:>4} {row['spill_bytes']:>6} "
            f"{row['shared_bytes']:>7} {row['warps_per_sm']:>5} {wgmma:>5}  {row['config']}"
            + ("" if row["default"] else "  (autotune candidate)"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alignclip_kernels.ptxas_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: both")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], action="append",
                        help="default: all three")
    parser.add_argument("--jobs", type=int, default=None, help="compiling processes (default: one per core)")
    parser.add_argument("--sample", action="store_true",
                        help="every kernel once per dtype and arch, and one autotune key's candidates")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "alignclip_kernels.ptxas_report", *sys.argv[1:]], env=env)
    print(f"{'kernel':<30} {'arch':<7} {'regs':>4} {'spill':>6} {'smem':>7} {'w/SM':>5} {'wgmma':>5}  config")
    rows = collect(tuple(args.arch or ARCHS), tuple(args.dtype or ("float32", "float16", "bfloat16")),
                   progress=lambda row: print(_format_row(row), flush=True), jobs=args.jobs, sample=args.sample)
    ok = [r for r in rows if not r["error"]]
    print(f"\n{len(rows)} kernel configurations compiled "
          f"({sum(1 for r in rows if not r['default'])} of them autotune candidates only), "
          f"{sum(1 for r in ok if r['spill_bytes'])} spilling, "
          f"lowest warps/SM {min((r['warps_per_sm'] for r in ok), default=0)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = failures(rows)
    for line in bad:
        print("FAIL:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
