"""Static GPU report without a GPU: `python -m alignclip_kernels.inspect [--json FILE]`.

For the paper's shapes (attention at ViT-B/32, B/16, L/14, H/14; the losses at B=108, P=196,
E=512, K in {7, 65, 345}, L=5, H=12) and fp32/fp16/bf16, every op is run forward and backward
on meta tensors with the dispatcher told to target sm_90 or sm_80; each kernel launch it would
make is recorded instead of run. Each distinct launch (kernel, constexprs, warps, stages and
Triton's own argument specialisation) is compiled with `triton.compile` for
GPUTarget("cuda", 90|80, 32), and the ptxas bundled with triton (`-v`, sm_90a / sm_80) reports
registers and spills. Shared memory is Triton's dynamic allocation plus ptxas's static count.
Resident warps per SM follow from registers, shared memory and warps against the chip's limits.
On sm_90a a row says whether its 16-bit `tl.dot`s lowered to `wgmma`.

Exit status 1 when a default configuration spills, exceeds shared memory (227 KB sm_90,
163 KB sm_80) or fails to compile. Must run without TRITON_INTERPRET (it re-executes itself
without it when set).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ARCHS = {"sm_90a": 9, "sm_80": 8}
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}      # per block, opt-in maximum
SMEM_PER_SM = {"sm_90a": 228 * 1024, "sm_80": 164 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

ATTENTION_SHAPES = {  # name: (B, H, N, D)
    "ViT-B/32": (108, 12, 50, 64),
    "ViT-B/16": (108, 12, 197, 64),
    "ViT-L/14": (108, 16, 257, 64),
    "ViT-H/14": (108, 16, 257, 80),
}
LOSS_SHAPE = dict(B=108, P=196, E=512, L=5, H=12)
CLASS_COUNTS = (7, 65, 345)


@dataclass
class Launch:
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    cases: list = field(default_factory=list)


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


def _op_runs(dtype):
    """(case name, op, callable running forward and backward on meta tensors)."""
    import torch

    from . import aal_kl, attention, roofline, similarity_align, sls_mms
    from .token_text_target import _TokenTextTarget

    meta = dict(device="meta", dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    runs = []
    for name, (b, h, n, d) in ATTENTION_SHAPES.items():
        def attn(b=b, h=h, n=n, d=d):
            qkv = torch.empty(b, n, 3, h, d, requires_grad=True, **meta)
            q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
            out, dv, rows = attention._DualAttention.apply(q, k, v, 1, d ** -0.5, True)
            torch.autograd.backward([out, dv, rows], [torch.empty_like(out), torch.empty_like(dv),
                                                      torch.empty_like(rows)])
        cost = roofline.fwd_bwd(roofline.attention, b, h, n, d, itemsize)
        runs.append((f"attention {name}", attn, cost))
    sb, p, e, n_layers, h = (LOSS_SHAPE[key] for key in ("B", "P", "E", "L", "H"))
    for k in CLASS_COUNTS:
        def losses(k=k):
            tokens = torch.empty(sb, p, e, requires_grad=True, **meta)
            tokens_dv = torch.empty(sb, p, e, requires_grad=True, **meta)
            text = torch.empty(k, e, **meta)
            labels = torch.empty(sb, dtype=torch.int64, device="meta")
            g = _TokenTextTarget.apply(tokens_dv, text, labels, 1.0)
            cls = torch.empty(n_layers, sb, h, p + 1, device="meta", requires_grad=True)
            loss = aal_kl._AALKL.apply(cls, g)
            loss = loss + similarity_align._SimilarityAlign.apply(tokens, tokens_dv, text)
            dist = torch.empty(k, k, device="meta")
            loss = loss + sls_mms._SLSMMS.apply(tokens[:, 0], text, labels, dist, 0.3, 100.0,
                                                0.9)[0]
            loss.backward()
        cost = (roofline.fwd_bwd(roofline.token_text_target, sb, p, e, itemsize)
                + roofline.fwd_bwd(roofline.aal_kl, n_layers, sb, h, p + 1)
                + roofline.fwd_bwd(roofline.similarity_align, sb, p, e, k, itemsize)
                + roofline.fwd_bwd(roofline.sls_mms, sb, e, k, itemsize))
        runs.append((f"losses K={k}", losses, cost))
    return runs


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
                      if key.startswith("BLOCK") or key in ("WRITE_DV", "HAS_DROW", "HAS_DDV",
                                                            "TEXT_GRAD", "CD_GRAD", "TARGET_GRAD"))
    dtypes = sorted({ty[1:] for ty in signature.values() if ty.startswith("*")} - {"i64", "i32"})
    return (f"{blocks} warps={kwargs.get('num_warps', 4)} stages={kwargs.get('num_stages', 3)} "
            f"ptr={'/'.join(dtypes)}")


def _ptxas(ptx, gpu_name):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(text.strip())

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

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


def _compile_row(launch, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(launch.fn, launch.args, launch.kwargs)
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs}
    row = dict(kernel=launch.kernel, config=_config_label(launch.fn, launch.kwargs, signature),
               arch=arch, default=True, cases=launch.cases, registers=None, spill_bytes=None,
               shared_bytes=None, warps_per_sm=None, wgmma=None, error=None)
    try:
        compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", ARCHS[arch] * 10, 32), options=options)
        ptx = compiled.asm["ptx"]
        stats = _ptxas(ptx, arch)
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


def collect(archs=tuple(ARCHS), dtypes=("float32", "float16", "bfloat16"), progress=None):
    """Report rows (one per distinct kernel launch × arch) and roofline rows (one per case)."""
    import torch

    from ._runtime import target_arch

    rows, roofline_rows = [], []
    for arch in archs:
        launches = {}
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for case, run, cost in _op_runs(dtype):
                with target_arch(ARCHS[arch]):
                    recorded = _record_launches(run)
                if arch == archs[0]:
                    roofline_rows.append(dict(case=case, dtype=dtype_name, **cost.as_dict()))
                for fn, args, kwargs in recorded:
                    sig = _specialise(fn, args, kwargs)
                    key = (fn.__name__, repr(sig), repr(sorted(kwargs.items(), key=str)))
                    if key not in launches:
                        launches[key] = Launch(fn.__name__, fn, args, kwargs)
                    label = f"{case} {dtype_name}"
                    if label not in launches[key].cases:
                        launches[key].cases.append(label)
        for launch in launches.values():
            row = _compile_row(launch, arch)
            if progress:
                progress(row)
            rows.append(row)
    return rows, roofline_rows


def failures(rows):
    bad = []
    for row in rows:
        if not row["default"]:
            continue
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
            f"{row['shared_bytes']:>7} {row['warps_per_sm']:>5} {wgmma:>5}  {row['config']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alignclip_kernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="default: both")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], action="append",
                        help="default: all three")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "alignclip_kernels.inspect", *sys.argv[1:]], env=env)
    print(f"{'kernel':<30} {'arch':<7} {'regs':>4} {'spill':>6} {'smem':>7} {'w/SM':>5} {'wgmma':>5}  config")
    rows, roof = collect(tuple(args.arch or ARCHS), tuple(args.dtype or ("float32", "float16", "bfloat16")),
                         progress=lambda row: print(_format_row(row), flush=True))
    print(f"\nroofline lower bound, forward + backward on an H200 (4.3 TB/s, 790 TFLOP/s):")
    for r in roof:
        print(f"  {r['case']:<22} {r['dtype']:<9} {r['bytes'] / 1e6:9.1f} MB {r['flops'] / 1e9:9.2f} GFLOP "
              f"{r['bound_us']:8.1f} us")
    ok = [r for r in rows if not r["error"]]
    print(f"\n{len(rows)} kernel configurations compiled, "
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
