"""Write BENCHMARKS.md (and a PNG bar chart per group) from the benchmark results.

    python benchmarks/report.py [RESULTS.json] [--work WORK.json] [--tiles TILES.json]
        [--ptxas PTXAS.json] [--out BENCHMARKS.md] [--plots benchmarks/plots] [--command "..."]

Per group: median wall time, kernel-only time (do_bench, and its CUDA-graph variant) on CUDA,
the speed-up over `reference`, the time relative to the group's floor, peak memory, achieved
TB/s and TFLOP/s and the ratio to the H200 roofline bound. `--work` puts the work counter's
model time beside each measured loss op; `--tiles` adds the tile sweep (fastest candidate beside
the static default) and the fused attention's per-kernel profile; `--ptxas` the static report.
Only what the files hold is reported.
"""
import argparse
import datetime
import json
import os
import re
import sys

TARGETS = """## Targets (H200, bf16), against the strongest rival of equal output

| what | target |
| --- | --- |
| attention fwd+bwd (out + dv + CLS row with gradients), ViT-B/16 B=108 | `fused` ≤ 1.00× the best of `sdpa-rows*` (SDPA on cuDNN / FlashAttention / memory-efficient, pinned, plus the CLS row as one small product) and `flex-rows` (FlexAttention with its log-sum-exp); ≥ 4× faster than `reference` |
| each loss op fwd+bwd at paper shapes | `fused` ≥ 1.5× faster than `compiled` (torch.compile of the reference op, compile time apart); ≥ 5× faster than `reference`; similarity-align peak memory independent of K |
| AlignCLIP train step, ViT-B/16 on 108 images | `alignclip-fused` ≤ 1.00× the best `alignclip-pytorch-path` step (our model and loss through the PyTorch paths) and ≤ 1.05× `clip-finetune-packed` (CLIPood) under the same compile setting; memory ≤ 0.8× `alignclip-reference` |
| input pipeline, one core | the host's work for an image (decode to the batch handed over) ≥ 3× the authors' `Compose` at 227×227 and ≥ 1.5× at 500×375, ≥ 3× DomainBed's stock `Compose` at 227×227; on a CPU-only run host + device work ≥ 1.0× the `Compose` for both transforms at both sizes; device work ≤ 6 launches a batch (≤ 12 with jitter), nothing larger than the output batch |

The roofline bounds come from `alignclip_kernels/roofline.py` (4.3 TB/s, 790 TFLOP/s). Each
group names its strongest rival of equal output and our time ÷ its time (below 1 is ours
faster); on CUDA `fused` is what the library runs for the shape (its per-shape choice between
its kernels and the SDPA composite, recorded under the group), `fused-triton` the kernels
alone. `sdpa` computes `out` only (no D-V branch, no CLS row): a floor, not a rival. The losses
have no per-shape choice: the work model puts their compiled rivals at ≥ 1.5× ours, and the
first GPU figures decide whether they need one. The input-pipeline groups time one batch on one
thread; `ours-in-all` adds the per-pixel work, which on a CPU machine runs on the same core.
"""
BASELINES = ("reference", "alignclip-reference")
FLOORS = ("sdpa", "clip-finetune-packed", "clip-finetune")
# per group kind: (our provider, its rivals of equal output)
RIVALS = {"attention": ("fused", ("sdpa-rows", "sdpa-rows-flash", "sdpa-rows-cudnn", "sdpa-rows-efficient",
                                  "flex-rows")),
          "train-step": ("alignclip-fused", ("alignclip-pytorch-path", "alignclip-pytorch-path-compiled")),
          "input-pipeline": ("ours-host", ("torchvision-v2",)),
          "loss": ("fused", ("compiled",))}


def _fmt_time(seconds):
    if seconds is None:
        return ""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def group_rows(results):
    groups = {}
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        row = {**info, "provider": info.get("provider", bench["name"]), "median": bench["stats"]["median"]}
        groups.setdefault(bench["group"] or bench["name"], []).append(row)
    return groups


def _time(row):
    """The time a comparison uses: kernel-only on CUDA, the wall median otherwise."""
    return row["kernel_ms"] / 1e3 if row.get("kernel_ms") else row["median"]


def _table(rows, model_us=None):
    base = next((_time(r) for r in rows if r["provider"] in BASELINES), None)
    floor = next((_time(r) for p in FLOORS for r in rows if r["provider"] == p), None)
    cuda = any("kernel_ms" in r for r in rows)
    images = all(r.get("images") for r in rows)
    head = (["provider", "backend", "median (wall)"] + (["images/s"] if images else [])
            + (["kernel", "CUDA graph"] if cuda else [])
            + ["× faster than reference", "÷ floor", "peak MB"]
            + (["TB/s", "TFLOP/s", "÷ roofline bound"] if cuda else []) + (["work-model time"] if model_us else []))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        t = _time(r)
        cells = [r["provider"] + (f" ({r['sdpa_backend']})" if r.get("sdpa_backend") else ""),
                 r.get("backend", ""), _fmt_time(r["median"])]
        if images:
            cells.append(f"{r['images'] / r['median']:.0f}")
        if cuda:
            cells += [_fmt_time(r["kernel_ms"] / 1e3) if r.get("kernel_ms") else "",
                      _fmt_time(r["graph_ms"] / 1e3) if r.get("graph_ms") else ""]
        cells += [f"{base / t:.2f}×" if base else "", f"{t / floor:.3f}" if floor else "",
                  f"{r['peak_memory_bytes'] / 2 ** 20:.0f}" if r.get("peak_memory_bytes") is not None else ""]
        if cuda:
            cells += [f"{r['tb_per_s']:.2f}" if "tb_per_s" in r else "",
                      f"{r['tflop_per_s']:.1f}" if "tflop_per_s" in r else "",
                      f"{t / r['bound_s']:.2f}" if r.get("bound_s") else ""]
        if model_us:
            cells.append(f"{model_us:.1f} µs (model)" if r["provider"] == "fused" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rival_line(group, rows):
    """Our time ÷ the strongest rival of equal output in this group, in one line."""
    kind = next((k for k in RIVALS if group.startswith(k)), "loss")
    ours, rivals = RIVALS[kind]
    timed = {r["provider"]: _time(r) for r in rows}
    present = [p for p in rivals if p in timed]
    if not present:
        return ""
    best = min(present, key=timed.get)
    line = f"Strongest rival of equal output: `{best}` ({_fmt_time(timed[best])})"
    if ours in timed:
        line += f"; `{ours}` ÷ it: **{timed[ours] / timed[best]:.3f}**"
    else:
        line += f"; `{ours}` not timed here"
    if kind == "train-step" and "alignclip-fused-compiled" in timed and "alignclip-pytorch-path-compiled" in timed:
        line += (f"; compiled: `alignclip-fused-compiled` ÷ `alignclip-pytorch-path-compiled` "
                 f"**{timed['alignclip-fused-compiled'] / timed['alignclip-pytorch-path-compiled']:.3f}**")
    choices = next((r["attention_choices"] for r in rows if r.get("attention_choices")), None)
    if choices:
        line += "; the library's choice: " + "; ".join(f"{key}: {c['path']} ({c['source']})" for key, c in choices.items())
    compiled = [f"`{r['provider']}` {r['compile_s']:.1f} s" for r in rows if r.get("compile_s") is not None]
    if compiled:
        line += "; compile time (not in the times above): " + ", ".join(compiled)
    return line + "."


def stall_line(rows):
    """What a background save costs the loop, as a share of the synchronous save (budget ≤ 10%)."""
    timed = {r["provider"]: _time(r) for r in rows}
    if not {"sync", "background"} <= timed.keys():
        return ""
    share = timed["background"] / timed["sync"]
    return (f"The loop waits {share:.1%} of the synchronous save for a background one "
            f"(budget ≤ 10%: {'met' if share <= 0.10 else 'missed'}).")


def attention_model_line(rows):
    """The work model's ratio of ours to the composite rival, from the group's shape."""
    from alignclip_kernels import roofline

    shaped = next((r for r in rows if r.get("shape")), None)
    if shaped is None:
        return ""
    b, h, n, d = shaped["shape"]
    isz = {"float32": 4}.get(shaped.get("dtype"), 2)
    ours = roofline.fwd_bwd(roofline.attention, b, h, n, d, isz)
    rival = roofline.fwd_bwd(roofline.attention_composite, b, h, n, d, isz)
    return (f"Model (not a measurement), forward + backward at this shape: ours moves {ours.bytes / 1e6:.0f} MB, "
            f"the SDPA composite at least {rival.bytes / 1e6:.0f} MB (k read again, the CLS row's gradients added "
            f"into SDPA's): at the memory bound ours takes {ours.bytes / rival.bytes:.2f}× its time.")


def _plot(group, rows, folder):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.5 + 0.45 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.barh([r["provider"] for r in rows], [_time(r) * 1e3 for r in rows], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(group, fontsize=10)
    fig.tight_layout()
    path = os.path.join(folder, f"{_slug(group)}.png")
    fig.savefig(path, dpi=90)
    return path


def work_model_times(work):
    """{(op, K): model µs of forward + backward} from the work counter's bf16 results."""
    names = {"token_text_target": "target", "aal_loss": "aal", "similarity_align": "similarity-align",
             "sls_mms": "sls-mms"}
    out = {}
    for r in work.get("results", []):
        if r["dtype"] == "bfloat16" and r["op"] in names and r["case"][2:].isdigit():
            out[(names[r["op"]], int(r["case"][2:]))] = sum(p["model_us"] for p in r["phases"].values())
    return out


def deterministic_section(work):
    """The deterministic mode's extra work: each deterministic case against the same case with
    atomics, forward + backward."""
    by_key = {(r["op"], r["case"], r["dtype"]): r for r in work.get("results", [])}
    lines = []
    for (op, case, dtype), r in by_key.items():
        base = by_key.get((op, case.replace(" deterministic", ""), dtype))
        if not case.endswith(" deterministic") or base is None:
            continue

        def total(result, key):
            return sum(p[key] for p in result["phases"].values())

        lines.append(f"| {op} | {case.replace(' deterministic', '')} | {dtype} | "
                     f"{total(r, 'macs') / total(base, 'macs'):.2f} | {total(r, 'unique') / total(base, 'unique'):.2f} | "
                     f"{sum(k['atomics'] for k in base['kernels'])} → {sum(k['atomics'] for k in r['kernels'])} | "
                     f"{total(base, 'model_us'):.1f} → {total(r, 'model_us'):.1f} |")
    if not lines:
        return ""
    return "\n".join(["## The deterministic mode's extra work (counted, not timed)", "",
                      "`deterministic=True` (or `torch.use_deterministic_algorithms(True)`) against the "
                      "default, forward + backward at the full batch. Atomics count every atomic "
                      "operation (the deterministic mode keeps only the integer arrival tickets).", "",
                      "| op | case | dtype | MACs ÷ default | unique bytes ÷ default | atomics | model µs |",
                      "|" + " --- |" * 7, *lines, ""])


def work_section(work):
    from alignclip_kernels.work import format_table

    return "\n".join(["## Work counted on the CPU (not timed)", "",
                      f"`python -m alignclip_kernels.work --json FILE` ({work.get('arch', 'sm_90')} "
                      "configurations, full batch). Executed vs necessary multiply-adds, unique vs "
                      "compulsory bytes, programs in the grid, and a model H200 time "
                      "(max(bytes ÷ 4.3 TB/s, FLOPs ÷ peak)): counted, not measured. Cases without a "
                      "budget: the deterministic mode and head dims padded to a power of two.", "",
                      format_table(work["results"]), "", deterministic_section(work)])


def tiles_section(tiles):
    lines = ["## Attention tile sweep and per-kernel profile", "", f"Device: {tiles['device']}.", "",
             "| shape | kernel | static default | fastest candidate | time (fastest) | ÷ default |",
             "| --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["shape"], r["kernel"]) for r in tiles["sweep"]})
    for shape, kernel in keys:
        rows = [r for r in tiles["sweep"] if r["shape"] == shape and r["kernel"] == kernel]
        default = next(r for r in rows if r["default"])
        best = min(rows, key=lambda r: r["ms"])
        lines.append(f"| {shape} | {kernel} | {default['config']} ({default['ms'] * 1e3:.1f} µs) | "
                     f"{best['config']} | {best['ms'] * 1e3:.1f} µs | {best['ms'] / default['ms']:.3f} |")
    lines += ["", "Fused fwd+bwd at ViT-B/16 B=108 bf16, torch.profiler, per step:", "",
              "| kernel | µs |", "| --- | --- |"]
    lines += [f"| {p['kernel'][:80]} | {p['us_per_step']:.1f} |" for p in tiles["profile"][:12]]
    return "\n".join(lines) + "\n"


def ptxas_section(rows):
    ok = [r for r in rows if not r.get("error")]
    spilling = [r for r in ok if r["spill_bytes"]]
    lowest = min(ok, key=lambda r: r["warps_per_sm"]) if ok else None
    lines = ["## Static GPU report (ptxas, no GPU needed)", "",
             f"`python -m alignclip_kernels.ptxas_report`: {len(rows)} kernel configurations "
             f"({sum(1 for r in rows if not r.get('default', True))} autotune candidates only), "
             f"{len(rows) - len(ok)} failed to compile, {len(spilling)} spill."]
    if lowest:
        lines.append(f"Lowest residency: {lowest['warps_per_sm']} warps/SM ({lowest['kernel']} on "
                     f"{lowest['arch']}, {lowest['registers']} registers, {lowest['config']}).")
    return "\n".join(lines) + "\n"


# The input pipeline's budgets (one core, vs that transform's Compose): host, in all on a CPU
PIPELINE_BUDGETS = {("alignclip", "227x227"): 3.0, ("alignclip", "500x375"): 1.5, ("domainbed", "227x227"): 3.0}


def _in_all_before(r):
    """Images per CPU-second, host + device, of a `pipeline` JSON from before this report's
    format (its worker figure and its device time per batch)."""
    per_image_device = r["device_ms_per_batch"] / 1e3 / r["batch"]
    return 1.0 / (1.0 / r["per_core"]["ours"] + per_image_device)


def pipeline_section(folder):
    """The input pipeline before and after, from `python -m alignclip pipeline --json` files
    named CASE-before.json and CASE-after.json in `folder` (CASE: data set and transforms)."""
    rows = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith("-after.json")):
        after = _read(os.path.join(folder, name))
        before_path = os.path.join(folder, name.replace("-after.json", "-before.json"))
        before = _read(before_path) if os.path.exists(before_path) else None
        size = "227x227" if after["dataset"] == "PACS" else "500x375"
        budget = PIPELINE_BUDGETS.get((after["transforms"], size))
        host = after["host_vs_authors"]
        rows.append(f"| {after['dataset']} ({size}) | {after['transforms']} | {after['per_core']['authors']:.0f} | "
                    + (f"{before['per_core']['ours'] / before['per_core']['authors']:.2f}x (worker alone) | "
                       f"{_in_all_before(before) / before['per_core']['authors']:.2f}x | " if before else "– | – | ")
                    + f"{host:.2f}x" + (f" ({'met' if host >= budget else 'missed'}: ≥ {budget}x)" if budget else "")
                    + f" | {after['in_all_vs_authors']:.2f}x ({'met' if after['in_all_vs_authors'] >= 1 else 'missed'}: "
                    f"≥ 1.0x) | {after['device_ms_per_batch']:.0f} ms, {after['device_launches']} launch"
                    f"{'es' if after['device_launches'] > 1 else ''} + {after['device_copies']} copies |")
    return "\n".join([
        "## Input pipeline, everything counted (one core, CPU time per image)", "",
        "`python -m alignclip pipeline --config configs/pacs.yaml --set data.root=DIR --steps 3 --workers 1 --json F` "
        "(and `configs/domain_net.yaml --set data.batch_size=18`, `--set data.transforms=domainbed`) on photo-like "
        "JPEGs in DomainBed layouts written by `benchmarks/fake_domainbed.py`; before = the commit before this "
        "pipeline (its worker decoded only; crop, resize, flip, jitter and normalisation ran on the device), run "
        "side by side. Ratios are against that transform's own `Compose` (the authors', or DomainBed's stock one "
        "with ColorJitter) over the same files with the same draws, batch by batch in one process.", "",
        "| data (size) | transforms | Compose, images/s per core | before: host | before: in all (host + device, "
        "CPU) | after: host (decode to the batch handed over) | after: in all on a CPU | device work per batch on "
        "the CPU, CUDA launches |",
        "|" + " --- |" * 8, *rows, ""])


def write_report(results, out, plots, command, work=None, tiles=None, ptxas=None, pipeline=None):
    os.makedirs(plots, exist_ok=True)
    groups = group_rows(results)
    when = results.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())
    devices = sorted({r.get("device", "?") for rows in groups.values() for r in rows})
    models = work_model_times(work) if work else {}
    parts = ["# Benchmarks", "", TARGETS, "## Latest measured figures", "",
             f"- date: {when}", f"- device: {', '.join(devices)}", f"- command: `{command}`", ""]
    if not any("kernel_ms" in r for rows in groups.values() for r in rows):
        parts += ["These figures were measured without a GPU: the PyTorch providers at reduced",
                  "shapes on the CPU. The Triton providers were not timed (interpreted kernels are",
                  "not timed), so nothing here speaks to the GPU targets above.", ""]
    for group in sorted(groups):
        rows = groups[group]
        op, _, k = group.partition(" K=")
        model = models.get((op, int(k))) if k.isdigit() else None
        path = _plot(group, rows, plots)
        notes = [rival_line(group, rows)] + ([attention_model_line(rows)] if group.startswith("attention-fwdbwd") else [])
        notes += [stall_line(rows)] if group.startswith("checkpoint-save") else []
        parts += [f"### {group}", "", _table(rows, model), "", *(n + "\n" for n in notes if n),
                  f"![{group}]({os.path.relpath(path, os.path.dirname(os.path.abspath(out)))})", ""]
    if pipeline:
        parts.append(pipeline_section(pipeline))
    if tiles:
        parts.append(tiles_section(tiles))
    if work:
        parts.append(work_section(work))
    if ptxas is not None:
        parts.append(ptxas_section(ptxas))
    with open(out, "w") as f:
        f.write("\n".join(parts))


def _read(path):
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def merge_results(folder, out):
    """One pytest-benchmark JSON from the per-module files in `folder` (gpu_check.sh runs each
    module with its own file, so that a timeout keeps the modules already done)."""
    merged = None
    for name in sorted(os.listdir(folder)):
        data = _read(os.path.join(folder, name))
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    if merged is None:
        raise SystemExit(f"no benchmark results in {folder}")
    with open(out, "w") as f:
        json.dump(merged, f)
    print(f"merged {len(merged['benchmarks'])} benchmarks into {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="?", default=os.path.join(".benchmarks", "results.json"),
                        help="pytest --benchmark-json output (default: where `pytest benchmarks/ --benchmark-only` "
                             "writes it)")
    parser.add_argument("--work", help="python -m alignclip_kernels.work --json output")
    parser.add_argument("--tiles", help="benchmarks/attention_tiles.py output")
    parser.add_argument("--ptxas", help="python -m alignclip_kernels.ptxas_report --json output")
    parser.add_argument("--pipeline", metavar="DIR", help="CASE-before.json / CASE-after.json files of "
                                                          "python -m alignclip pipeline --json")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--plots", default=os.path.join("benchmarks", "plots"))
    parser.add_argument("--command", default="pytest benchmarks/ --benchmark-only")
    parser.add_argument("--merge", metavar="DIR", help="only merge the benchmark JSON files in DIR (--merge-out)")
    parser.add_argument("--merge-out", metavar="FILE", help="where --merge writes")
    args = parser.parse_args(argv)
    if args.merge:
        merge_results(args.merge, args.merge_out)
        return 0
    write_report(_read(args.results), args.out, args.plots, args.command, _read(args.work),
                 _read(args.tiles), _read(args.ptxas), args.pipeline)
    print(f"wrote {args.out} and {args.plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
