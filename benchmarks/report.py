"""Write BENCHMARKS.md (and a PNG bar chart per group) from a pytest-benchmark JSON file.

    python benchmarks/report.py RESULTS.json [--inspect INSPECT.json] [--out BENCHMARKS.md]
                                [--plots benchmarks/plots] [--command "..."]

Per group: median time, speed-up over `reference` (or `alignclip-reference`), time relative to
the floor (`sdpa` or `clip-finetune`), peak memory, achieved TB/s and TFLOP/s and the ratio to
the H200 roofline bound where the run had a GPU. Only what the JSON holds is reported.
"""
import argparse
import datetime
import json
import os
import re
import sys

TARGETS = """## Targets (H200, bf16)

| what | target |
| --- | --- |
| attention fwd+bwd (out + dv + CLS row), ViT-B/16 B=108 | ≤ 1.10× `sdpa` (flash, out only) and ≥ 4× faster than `reference` |
| each loss op fwd+bwd at paper shapes | ≥ 5× faster than `reference`; similarity-align peak memory independent of K |
| AlignCLIP train step, ViT-B/16 on 108 images | ≤ 1.05× `clip-finetune` (the D-V path's extra GEMMs are about 4.5% of the FLOPs: the floor), ≥ 1.8× faster than `alignclip-reference`, memory ≤ 0.8× `alignclip-reference` |

The roofline bounds come from `alignclip_kernels/roofline.py` (4.3 TB/s, 790 TFLOP/s).
`dual-block-out-proj` compares the two out_proj arrangements of a dual block; the model uses
the faster (`split` by default: two GEMMs, the second reading the strided dv view directly).
"""
BASELINES = ("reference", "alignclip-reference")
FLOORS = ("sdpa", "clip-finetune")


def _fmt_time(seconds):
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
        row = {"provider": bench["name"], **info, "median": bench["stats"]["median"]}
        groups.setdefault(bench["group"] or bench["name"], []).append(row)
    return groups


def _table(rows):
    base = next((r["median"] for r in rows if r["provider"] in BASELINES), None)
    floor = next((r["median"] for r in rows if r["provider"] in FLOORS), None)
    head = "| provider | backend | median | × faster than reference | ÷ floor | peak MB | TB/s | TFLOP/s | ÷ roofline bound |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        cells = [r["provider"], r.get("backend", ""), _fmt_time(r["median"]),
                 f"{base / r['median']:.2f}×" if base else "",
                 f"{r['median'] / floor:.3f}" if floor else "",
                 f"{r['peak_memory_bytes'] / 2 ** 20:.0f}" if r.get("peak_memory_bytes") is not None else "",
                 f"{r['tb_per_s']:.2f}" if "tb_per_s" in r else "",
                 f"{r['tflop_per_s']:.1f}" if "tflop_per_s" in r else "",
                 f"{r['median'] / r['bound_s']:.2f}" if r.get("bound_s") and "tb_per_s" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(group, rows, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    ax.barh([r["provider"] for r in rows], [r["median"] * 1e3 for r in rows], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms)")
    ax.set_title(group, fontsize=10)
    fig.tight_layout()
    path = os.path.join(folder, f"{_slug(group)}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def inspect_section(rows):
    ok = [r for r in rows if not r.get("error")]
    spilling = [r for r in ok if r["spill_bytes"]]
    lowest = min(ok, key=lambda r: r["warps_per_sm"]) if ok else None
    lines = ["## Static GPU report (ptxas, no GPU needed)", "",
             f"`python -m alignclip_kernels.inspect`: {len(rows)} kernel configurations "
             f"(kernels × dispatcher configurations × sm_90a/sm_80), {len(rows) - len(ok)} failed to "
             f"compile, {len(spilling)} spill."]
    if lowest:
        lines.append(f"Lowest residency: {lowest['warps_per_sm']} warps/SM ({lowest['kernel']} on "
                     f"{lowest['arch']}, {lowest['registers']} registers, {lowest['config']}).")
    wg = [r for r in ok if r["arch"] == "sm_90a" and r["wgmma"] is not None]
    without = sorted({f"{r['kernel']} ({r['config'].split('ptr=')[-1]})" for r in wg if not r["wgmma"]})
    lines.append(f"On sm_90a, {sum(1 for r in wg if r['wgmma'])} of {len(wg)} configurations with "
                 f"tensor-core dots lower to wgmma; the others use mma.sync: {', '.join(without) or 'none'}.")
    return "\n".join(lines) + "\n"


def write_report(results, out, plots, command, inspect_rows=None):
    os.makedirs(plots, exist_ok=True)
    groups = group_rows(results)
    when = results.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())
    devices = sorted({r.get("device", "?") for rows in groups.values() for r in rows})
    parts = ["# Benchmarks", "", TARGETS,
             "## Latest measured figures", "",
             f"- date: {when}", f"- device: {', '.join(devices)}", f"- command: `{command}`", ""]
    if not any("tb_per_s" in r for rows in groups.values() for r in rows):
        parts += ["These figures were measured without a GPU: the PyTorch providers at reduced",
                  "shapes on the CPU. The Triton providers were not timed (interpreted kernels are",
                  "not timed), so nothing here speaks to the GPU targets above.", ""]
    for group in sorted(groups):
        rows = groups[group]
        path = _plot(group, rows, plots)
        parts += [f"### {group}", "", _table(rows), "",
                  f"![{group}]({os.path.relpath(path, os.path.dirname(os.path.abspath(out)))})", ""]
    if inspect_rows is not None:
        parts.append(inspect_section(inspect_rows))
    with open(out, "w") as f:
        f.write("\n".join(parts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="pytest --benchmark-json output")
    parser.add_argument("--inspect", help="python -m alignclip_kernels.inspect --json output")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--plots", default=os.path.join("benchmarks", "plots"))
    parser.add_argument("--command", default="pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    inspect_rows = None
    if args.inspect:
        with open(args.inspect) as f:
            inspect_rows = json.load(f)
    write_report(results, args.out, args.plots, args.command, inspect_rows)
    print(f"wrote {args.out} and {args.plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
