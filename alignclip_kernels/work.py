"""Count what the kernels execute, on the CPU: `python -m alignclip_kernels.work [--json FILE]
[--arch sm_90|sm_80] [--quick]`.

Every op runs forward and backward under Triton's interpreter with the launch configurations
its dispatcher picks on the target GPU (sm_90 by default: the static defaults that
`ALIGNCLIP_AUTOTUNE=0` pins, and the per-image program splits of the full batch), at the paper's
shapes with the batch reduced: each case runs at batch 1 and 2 and every count, being affine in
the batch, is extrapolated to the full batch (B = 108, or B·H for attention, whose heads are
independent). Hooks on the interpreter's builder count, per launch:

- multiply-adds: tensor-core `tl.dot`s at their padded tile shapes (masked lanes included:
  the GPU runs them; fp32 three-pass TF32 dots count three passes) and the CUDA-core products
  of `kernel_utils` (`gemv`, `gemv_t`, `outer_fma`, `fma_dot`);
- bytes loaded and stored under their masks, atomics, and the unique bytes a launch touches
  (the compulsory HBM traffic of that launch: a buffer written by one launch and read by the
  next counts in both);
- programs in the grid.

These are compared with `roofline` (necessary multiply-adds, compulsory bytes) and turned into
a model H200 time per kernel, max(unique bytes / 4.3 TB/s, tensor FLOPs / 790 TFLOP/s + CUDA-core
FLOPs / 67 TFLOP/s): a model, not a measurement. The budgets (bf16, the training dtype) are
checked and the exit status is 1 when one fails.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .paper import LABEL_EPSILON, LOGIT_SCALE, MARGIN_ALPHA

PAPER_SLS = (MARGIN_ALPHA, LOGIT_SCALE, LABEL_EPSILON)   # the SLS op's alpha, scale, epsilon
ARCHS = {"sm_90": 9, "sm_80": 8}
COUNTED_HELPERS = {  # helper: multiply-adds from its arguments' shapes
    "gemv": lambda mat, vec: _numel(mat),
    "gemv_t": lambda mat, vec: _numel(mat),
    "outer_fma": lambda acc, col, row: _numel(acc),
    "fma_dot": lambda a, b: _numel(a) * _shape(b)[-1],
}
ATTENTION_SHAPES = {"ViT-B/16": (108, 12, 197, 64), "ViT-L/14": (108, 16, 257, 64)}
PADDED_ATTENTION_SHAPES = {"ViT-g/14 (D=88 in 128 columns)": (108, 16, 257, 88)}   # counted, no budget
LOSS_SHAPE = dict(B=108, P=196, E=512, L=5, H=12)
CLASS_COUNTS = (7, 65, 345)
DETERMINISTIC_CLASS_COUNTS = (7, 345)
BUDGETS = {
    "loss_macs": 1.3, "loss_bytes": 1.2, "loss_programs": 132,
    "attention_fwd_macs": 1.25, "attention_bwd_macs": 1.4, "probe_overhead": 1.02,
}


def _shape(x):
    return tuple(int(getattr(s, "value", s)) for s in x.shape)


def _numel(x):
    n = 1
    for s in _shape(x):
        n *= s
    return n


@dataclass
class Launch:
    kernel: str
    phase: str
    programs: int = 0
    tensor_macs: int = 0
    fma_macs: int = 0
    loaded: int = 0
    stored: int = 0
    atomics: int = 0
    unique: int = 0
    addresses: list = field(default_factory=list, repr=False)

    def touch(self, ptrs, mask, itemsize):
        import numpy as np

        addr = ptrs[np.broadcast_to(mask, ptrs.shape)] if mask is not None else ptrs.ravel()
        self.addresses.append((addr.astype(np.uint64), itemsize))
        return addr.size * itemsize

    def close(self):
        import numpy as np

        by_size = {}
        for addr, size in self.addresses:
            by_size.setdefault(size, []).append(addr)
        self.unique = sum(len(np.unique(np.concatenate(parts))) * size for size, parts in by_size.items())
        self.addresses = []


class Counter:
    """Context manager that records a `Launch` per interpreted kernel launch."""

    def __init__(self):
        self.launches: List[Launch] = []
        self.phase = "fwd"
        self._current = None

    def __enter__(self):
        from triton.runtime import interpreter as interp

        self._patches = []
        counter = self

        def patch(owner, name, make):
            original = getattr(owner, name)
            self._patches.append((owner, name, original))
            setattr(owner, name, make(original))

        def element_size(handle):
            return handle.get_element_ty().primitive_bitwidth // 8

        def on_load(original):
            def load(builder, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
                if counter._current is not None:
                    counter._current.loaded += counter._current.touch(ptrs.data, mask.data,
                                                                      element_size(ptrs))
                return original(builder, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)
            return load

        def on_store(original):
            def store(builder, ptrs, value, mask, cache_modifier, eviction_policy):
                if counter._current is not None:
                    counter._current.stored += counter._current.touch(ptrs.data, mask.data,
                                                                      element_size(ptrs))
                return original(builder, ptrs, value, mask, cache_modifier, eviction_policy)
            return store

        def on_atomic(original):
            def atomic(builder, op, ptr, val, mask, sem, scope):
                if counter._current is not None:
                    import numpy as np

                    lanes = int(np.broadcast_to(mask.data, ptr.data.shape).sum())
                    counter._current.atomics += lanes
                    counter._current.touch(ptr.data, mask.data, element_size(ptr))
                return original(builder, op, ptr, val, mask, sem, scope)
            return atomic

        def on_dot(original):
            def dot(builder, a, b, d, input_precision, max_num_imprecise_acc):
                if counter._current is not None:
                    passes = 3 if "TF32x3" in str(input_precision) else 1
                    counter._current.tensor_macs += passes * a.data.size * b.data.shape[-1]
                return original(builder, a, b, d, input_precision, max_num_imprecise_acc)
            return dot

        def on_helper(original):
            def call(fn, *args, **kwargs):
                rule = COUNTED_HELPERS.get(fn.__name__)
                if rule is not None and counter._current is not None:
                    counter._current.fma_macs += rule(*args, **kwargs)
                return original(fn, *args, **kwargs)
            return call

        def on_launch(original):
            def launch(executor, *args, **kwargs):
                record = Launch(executor.fn.__name__, counter.phase)
                counter.launches.append(record)
                counter._current = record
                try:
                    result = original(executor, *args, **kwargs)
                finally:
                    counter._current = None
                grid = interp.interpreter_builder.grid_dim
                record.programs = grid[0] * grid[1] * grid[2]
                record.close()
                return result
            return launch

        patch(interp.InterpreterBuilder, "create_masked_load", on_load)
        patch(interp.InterpreterBuilder, "create_masked_store", on_store)
        patch(interp.InterpreterBuilder, "create_atomic_rmw", on_atomic)
        patch(interp.InterpreterBuilder, "create_dot", on_dot)
        patch(interp.InterpretedFunction, "__call__", on_helper)
        patch(interp.GridExecutor, "__call__", on_launch)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        return False


@dataclass
class Case:
    op: str
    label: str
    dtype: str
    full_batch: int                    # images (attention: images × heads)
    make: Callable                     # make(batch) -> (forward(), backward())
    necessary: tuple                   # (forward Cost, backward Cost) at the full batch
    budget: Optional[str] = None       # "loss" | "attention" | None


def _affine(c1, c2, batch):
    return c1 + (c2 - c1) * (batch - 1)


def measure(case, arch):
    """Per-kernel rows of one case, counted at batch 1 and 2 and extrapolated."""
    from ._runtime import counted_batch, target_arch

    runs = []
    for batch in (1, 2):
        counter = Counter()
        with target_arch(ARCHS[arch]), counted_batch(case.full_batch / batch):
            forward, backward = case.make(batch)
            with counter:
                state = forward()
                counter.phase = "bwd"
                backward(state)
        runs.append(counter.launches)
    if [(x.kernel, x.phase) for x in runs[0]] != [(x.kernel, x.phase) for x in runs[1]]:
        raise RuntimeError(f"{case.op} {case.label}: launches differ between batch 1 and 2")
    rows = []
    fields = ("programs", "tensor_macs", "fma_macs", "loaded", "stored", "atomics", "unique")
    for one, two in zip(*runs):
        row = {"kernel": one.kernel, "phase": one.phase}
        row.update({f: _affine(getattr(one, f), getattr(two, f), case.full_batch) for f in fields})
        rows.append(row)
    return rows


def _model_us(row):
    from . import roofline

    flops_time = 2 * row["tensor_macs"] / roofline.H200_TENSOR_FLOPS + \
        2 * row["fma_macs"] / roofline.H200_FMA_FLOPS
    return max(row["unique"] / roofline.H200_BYTES_PER_S, flops_time) * 1e6


def summarize(case, rows):
    """Per-phase and total ratios of a case, and which budgets it breaks."""
    out = {"op": case.op, "case": case.label, "dtype": case.dtype, "kernels": rows}
    phases = {}
    for phase, cost in zip(("fwd", "bwd"), case.necessary):
        mine = [r for r in rows if r["phase"] == phase]
        macs = sum(r["tensor_macs"] + r["fma_macs"] for r in mine)
        unique = sum(r["unique"] for r in mine)
        phases[phase] = dict(
            launches=len(mine), macs=macs, necessary_macs=cost.macs, unique=unique,
            loaded=sum(r["loaded"] for r in mine), compulsory=cost.bytes,
            mac_ratio=macs / cost.macs if cost.macs else None,
            byte_ratio=unique / cost.bytes if cost.bytes else None,
            model_us=sum(_model_us(r) for r in mine),
            min_programs=min((r["programs"] for r in mine), default=0))
    total_macs = sum(p["macs"] for p in phases.values())
    necessary = sum(p["necessary_macs"] for p in phases.values())
    out.update(phases=phases,
               mac_ratio=total_macs / necessary if necessary else None,
               byte_ratio=sum(p["unique"] for p in phases.values())
               / sum(p["compulsory"] for p in phases.values()))
    out["failures"] = _budget_failures(case, out)
    return out


def _budget_failures(case, result):
    if case.dtype != "bfloat16" or case.budget is None:
        return []
    fails = []
    if case.budget == "loss":
        if result["mac_ratio"] is not None and result["mac_ratio"] > BUDGETS["loss_macs"]:
            fails.append(f"executed/necessary MACs {result['mac_ratio']:.3f} > {BUDGETS['loss_macs']}")
        if result["byte_ratio"] > BUDGETS["loss_bytes"]:
            fails.append(f"unique/compulsory bytes {result['byte_ratio']:.3f} > {BUDGETS['loss_bytes']}")
        for row in result["kernels"]:
            if row["programs"] < BUDGETS["loss_programs"]:
                fails.append(f"{row['kernel']} runs {row['programs']} programs < {BUDGETS['loss_programs']}")
    else:
        for phase, key in (("fwd", "attention_fwd_macs"), ("bwd", "attention_bwd_macs")):
            ratio = result["phases"][phase]["mac_ratio"]
            if ratio > BUDGETS[key]:
                fails.append(f"{phase} executed/necessary MACs {ratio:.3f} > {BUDGETS[key]}")
    return fails


# -- the cases -----------------------------------------------------------------------------------

def _attention_cases(dtype_name, quick):
    import torch

    from . import attention, roofline

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    training = (1, True, True, False)     # the CLS row with its gradient, d(dv): AlignCLIP's step
    variants = [training, (1, False, True, False), (0, False, True, False), (1, True, False, False)]
    deterministic = (1, True, True, True)
    shapes = dict(list(ATTENTION_SHAPES.items())[:1]) if quick else ATTENTION_SHAPES
    plan = [(name, shape, variant, "attention") for name, shape in shapes.items()
            for variant in ([training, (0, False, True, False)] if quick else variants)]
    plan.append(("ViT-B/16", ATTENTION_SHAPES["ViT-B/16"], deterministic, None))
    if not quick:
        plan += [(name, shape, training, None) for name, shape in PADDED_ATTENTION_SHAPES.items()]
    cases = []
    for name, (b, h, n, d), (rows, d_rows, d_dv, exact), budget in plan:
        def make(batch, n=n, d=d, rows=rows, d_rows=d_rows, d_dv=d_dv, exact=exact):
            gen = torch.Generator().manual_seed(0)
            qkv = torch.randn(batch, n, 3, 1, d, generator=gen).to(dtype)
            q, k, v = attention._packed_views(qkv)
            scale = d ** -0.5

            def forward():
                return attention._attention_fwd(q, k, v, rows, scale, None)

            def backward(state):
                out, lse, row_attn = state
                grads = torch.empty((batch, n, 3, 1, d), dtype=dtype)
                dq, dk, dv = attention._packed_views(grads)
                d_out = torch.randn_like(out)
                d_dv_t = torch.randn_like(out) if d_dv else None
                d_rows_t = torch.randn_like(row_attn) if d_rows and rows else None
                attention._attention_bwd(d_out, d_dv_t, d_rows_t, q, k, v, out, lse, row_attn,
                                         rows, scale, dq, dk, dv, exact_order=exact)
            return forward, backward

        label = f"{name} rows={rows}" + (" d(rows)" if d_rows and rows else "") + \
            (" d(dv)" if d_dv else "") + (" deterministic" if exact else "")
        necessary = (roofline.attention(b, h, n, d, itemsize, rows=rows),
                     roofline.attention(b, h, n, d, itemsize, rows=rows, backward=True,
                                        d_rows=d_rows and rows > 0, d_dv=d_dv))
        cases.append(Case("attention", label, dtype_name, b * h, make, necessary, budget))
    return cases


def _loss_inputs(batch, k, dtype, gen):
    import torch
    import torch.nn.functional as F

    p, e = LOSS_SHAPE["P"], LOSS_SHAPE["E"]
    tokens = torch.randn(batch, p, e, generator=gen).to(dtype)
    tokens_dv = torch.randn(batch, p, e, generator=gen).to(dtype)
    text = F.normalize(torch.randn(k, e, generator=gen), dim=-1).to(dtype)
    labels = torch.arange(batch) % k        # distinct labels, as at the full batch
    return tokens, tokens_dv, text, labels


def _loss_cases(dtype_name, quick):
    import torch

    from . import aal, roofline, similarity_align, sls_mms
    from .token_text_target import _target_bwd, _target_fwd

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    b, p, e, n_layers, h = (LOSS_SHAPE[key] for key in ("B", "P", "E", "L", "H"))
    cases = []
    counts = (7, 65) if quick else CLASS_COUNTS
    # The deterministic mode at the training's own calls (no text gradient), counted without budgets.
    plan = [(k, False) for k in counts] + ([] if quick else [(k, True) for k in DETERMINISTIC_CLASS_COUNTS])
    for k, exact in plan:
        label, budget = f"K={k}" + (" deterministic" if exact else ""), None if exact else "loss"
        def make_similarity(batch, k=k, exact=exact):
            tokens, tokens_dv, text, _ = _loss_inputs(batch, k, dtype, torch.Generator().manual_seed(k))

            def forward():
                return similarity_align._sim_fwd(tokens, tokens_dv, text, exact)

            def backward(state):
                similarity_align._sim_bwd(torch.ones(()), tokens, tokens_dv, text, state[1], state[2], False, exact)
            return forward, backward

        cases.append(Case("similarity_align", label, dtype_name, b, make_similarity,
                          (roofline.similarity_align(b, p, e, k, itemsize),
                           roofline.similarity_align(b, p, e, k, itemsize, backward=True)), budget))

        def make_sls(batch, k=k, exact=exact):
            tokens, _, text, labels = _loss_inputs(batch, k, dtype, torch.Generator().manual_seed(k))
            feats = tokens[:, 0].contiguous()
            dist = sls_mms.class_distribution(text.float())

            def forward():
                return sls_mms._sls_fwd(feats, text, labels, dist, *PAPER_SLS, exact)

            def backward(state):
                _, logits, lse, target_sum = state
                sls_mms._sls_bwd(torch.ones(()), None, feats, text, labels, dist, logits, lse,
                                 target_sum, *PAPER_SLS, False, False, exact)
            return forward, backward

        cases.append(Case("sls_mms", label, dtype_name, b, make_sls,
                          (roofline.sls_mms(b, e, k, itemsize),
                           roofline.sls_mms(b, e, k, itemsize, backward=True)), budget))

        def make_target(batch, k=k, exact=exact):
            _, tokens_dv, text, labels = _loss_inputs(batch, k, dtype, torch.Generator().manual_seed(k))

            def forward():
                return _target_fwd(tokens_dv, text, labels, 1.0)

            def backward(state):
                g, row_stats = state
                _target_bwd(torch.randn_like(g), tokens_dv, text, labels, g, row_stats, 1.0, False, exact)
            return forward, backward

        cases.append(Case("token_text_target", label, dtype_name, b, make_target,
                          (roofline.token_text_target(b, p, e, itemsize, k=k),
                           roofline.token_text_target(b, p, e, itemsize, k=k, backward=True)), budget))

        def make_aal(batch, k=k, exact=exact):
            _, tokens_dv, text, labels = _loss_inputs(batch, k, dtype, torch.Generator().manual_seed(k))
            cls = torch.softmax(torch.randn(n_layers, batch, h, p + 1), -1)

            def forward():
                return aal._aal_fwd(cls, None, tokens_dv, text, labels, 1.0, exact)

            def backward(state):
                _, mean, z, row_stats, stats = state
                aal._aal_bwd(torch.ones(()), cls, None, tokens_dv, text, labels, 1.0, mean, z,
                             row_stats, stats, False, False, exact)
            return forward, backward

        cases.append(Case("aal_loss", label, dtype_name, b, make_aal,
                          (roofline.aal(n_layers, b, h, p + 1, e, itemsize, k=k),
                           roofline.aal(n_layers, b, h, p + 1, e, itemsize, k=k, backward=True)),
                          budget))

    def make_kl(batch):
        cls = torch.softmax(torch.randn(n_layers, batch, h, p + 1), -1)
        target = torch.softmax(torch.randn(batch, p), -1)

        def forward():
            return aal._aal_fwd(cls, target, None, None, None, 1.0)

        def backward(state):
            _, mean, z, row_stats, stats = state
            aal._aal_bwd(torch.ones(()), cls, target, None, None, None, 1.0, mean, z, row_stats,
                         stats, True, False)
        return forward, backward

    cases.append(Case("aal_kl_loss", "L=5 H=12", dtype_name, b, make_kl,
                      (roofline.aal_kl(n_layers, b, h, p + 1),
                       roofline.aal_kl(n_layers, b, h, p + 1, backward=True)), "loss"))
    return cases


def cases(dtypes=("bfloat16", "float32"), quick=False, ops=("attention", "losses")):
    out = []
    for dtype in dtypes:
        if "attention" in ops:
            out += _attention_cases(dtype, quick)
        if "losses" in ops:
            out += _loss_cases(dtype, quick)
    return out


def collect(arch="sm_90", dtypes=("bfloat16", "float32"), quick=False, ops=("attention", "losses"),
            progress=None):
    results = []
    for case in cases(dtypes, quick, ops):
        result = summarize(case, measure(case, arch))
        results.append(result)
        if progress:
            progress(result)
    return results


def probe_failures(results):
    """The probe rows' overhead: rows=1 against rows=0 forward, d(rows) against none backward."""
    fails = []
    by_key = {(r["op"], r["dtype"], r["case"]): r for r in results if r["op"] == "attention"}
    for (op, dtype, label), r in by_key.items():
        if dtype != "bfloat16":
            continue
        shape = label.split(" rows=")[0]
        plain = by_key.get((op, dtype, f"{shape} rows=0 d(dv)"))
        if plain and label.startswith(f"{shape} rows=1"):
            ratio = r["phases"]["fwd"]["macs"] / plain["phases"]["fwd"]["macs"]
            if ratio > BUDGETS["probe_overhead"]:
                fails.append(f"{label}: forward MACs {ratio:.3f}× rows=0's")
        without = by_key.get((op, dtype, label.replace(" d(rows)", "")))
        if " d(rows)" in label and without:
            ratio = r["phases"]["bwd"]["macs"] / without["phases"]["bwd"]["macs"]
            if ratio > BUDGETS["probe_overhead"]:
                fails.append(f"{label}: backward MACs {ratio:.3f}× without d(rows)")
    return fails


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def format_table(results):
    """Markdown: one row per op case and phase (kernels joined), counted at the full batch."""
    lines = ["| op | case | dtype | phase | kernels (programs) | MACs exec ÷ necessary | "
             "unique ÷ compulsory bytes | loaded ÷ compulsory | atomics | model µs (H200) |",
             "|" + " --- |" * 10]
    for r in results:
        for phase, p in r["phases"].items():
            kernels = ", ".join(f"{k['kernel'].strip('_')} ({k['programs']})" for k in r["kernels"]
                                if k["phase"] == phase)
            atomics = sum(k["atomics"] for k in r["kernels"] if k["phase"] == phase)
            lines.append(
                f"| {r['op']} | {r['case']} | {r['dtype']} | {phase} | {kernels} | "
                f"{_fmt_ratio(p['mac_ratio'])} | {_fmt_ratio(p['byte_ratio'])} | "
                f"{_fmt_ratio(p['loaded'] / p['compulsory'] if p['compulsory'] else None)} | "
                f"{atomics} | {p['model_us']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alignclip_kernels.work",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write every case's counts as JSON")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], action="append",
                        help="default: both")
    parser.add_argument("--ops", choices=["attention", "losses"], action="append",
                        help="default: both")
    parser.add_argument("--quick", action="store_true",
                        help="ViT-B/16 and K in {7, 65} only (the CI test)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "alignclip_kernels.work", *sys.argv[1:]], env=env)
    results = collect(args.arch, tuple(args.dtype or ("bfloat16", "float32")), args.quick,
                      tuple(args.ops or ("attention", "losses")),
                      progress=lambda r: print(f"counted {r['op']} {r['case']} {r['dtype']}",
                                               file=sys.stderr, flush=True))
    print(f"Work counted on the CPU under Triton's interpreter, {args.arch} launch configurations, "
          f"extrapolated to the full batch (B=108; attention B·H). Model times are a model, not a "
          f"measurement. fp32 tensor-core dots count three passes (tf32x3).\n")
    print(format_table(results))
    fails = [f"{r['op']} {r['case']} {r['dtype']}: {f}" for r in results for f in r["failures"]]
    fails += probe_failures(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "budgets": BUDGETS, "results": results,
                       "failures": fails}, f, indent=1)
    print()
    for line in fails:
        print("OVER BUDGET:", line)
    print(f"{len(results)} cases, {len(fails)} over budget")
    return 1 if fails else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
