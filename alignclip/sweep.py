"""One command per paper table: every (target domain, seed) of a configuration as its own run,
then `results.md` and `results.json` with mean ± std over seeds.

    python -m alignclip sweep --config configs/pacs.yaml [--seeds 0 1 2] [--targets all]
                              [--baseline] [--max-steps N] [--set key=value ...]

Runs go to OUTPUT_DIR/<method>/target<t>-seed<s> (method: alignclip, or clipood for
`--baseline`, the same configuration with loss.align false). A finished run (summary.json) is
skipped, an interrupted one resumed, so re-running the same command after a crash continues. A
run that fails is reported in the table, not lost. Per target and on average the table gives
last / BMA / best accuracy on the target's test split (open class: base, new and their harmonic
mean; in the wild: base and open); with `--baseline` also CLIPood's, the gain and the step-time
ratio AlignCLIP ÷ CLIPood measured in those runs.
"""
import json
import os
import statistics
import traceback

from .checkpoint import RunError
from .config import load_config
from .data import DATASETS
from .data.domainbed import load_domains
from .run import RunFolder, Stopped
from .train import data_config

MODELS = ("last", "bma", "best")


def targets_of(cfg, requested):
    """Target indices to sweep: `all` (every domain) or the given ones; open class has none."""
    if cfg.task == "open_class":
        return [None]
    if requested in (None, ["all"]):
        if cfg.data.dataset in DATASETS and DATASETS[cfg.data.dataset][1]:
            return list(range(len(DATASETS[cfg.data.dataset][1])))
        from .distributed import Dist

        root = data_config(cfg, Dist()).root
        return list(range(len(load_domains(root, cfg.data.dataset)[0])))
    return [int(t) for t in requested]


def _metrics(summary, task):
    """{model: {metric: accuracy}} from a run summary: test (and open / harmonic mean)."""
    out = {}
    for model in MODELS:
        accs = summary.get(model)
        if not accs:
            continue
        row = {"test": accs.get("test")}
        if task in ("open_class", "in_the_wild"):
            row["open"] = accs.get("open")
            if task == "open_class" and row["test"] is not None and row["open"] is not None:
                b, n = row["test"], row["open"]
                row["harmonic"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
        out[model] = row
    return out


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(ms):
    return "–" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def sweep(config_path, *, seeds=(0, 1, 2), targets=None, baseline=False, max_steps=None,
          overrides=(), output_dir=None, echo=print, train=None):
    """Run the sweep and write results.md / results.json under the output folder; returns the
    results dict. `train` is the training function (alignclip.train.train by default)."""
    if train is None:
        from .train import train
    base_cfg = load_config(config_path, overrides)
    root_dir = output_dir or base_cfg.output_dir
    methods = [("alignclip", [])] + ([("clipood", ["loss.align=false"])] if baseline else [])
    runs = []
    target_list = targets_of(base_cfg, targets)
    total = len(methods) * len(target_list) * len(seeds)
    for method, extra in methods:
        for target in target_list:
            for seed in seeds:
                name = f"seed{seed}" if target is None else f"target{target}-seed{seed}"
                out = os.path.join(root_dir, method, name)
                sets = [*overrides, *extra, f"seed={seed}", f"output_dir={out}"]
                if target is not None:
                    sets.append(f"data.targets=[{target}]")
                record = {"method": method, "target": target, "seed": seed, "output_dir": out}
                folder = RunFolder(out)
                try:
                    cfg = load_config(config_path, sets)
                    if os.path.exists(folder.summary):
                        with open(folder.summary) as f:
                            summary = json.load(f)
                        status = "done before"
                    else:
                        summary = train(cfg, max_steps=max_steps, resume=folder.holds_run(), echo=echo)
                        status = "ran"
                    record.update(status="ok", summary=summary, metrics=_metrics(summary, cfg.task))
                except Stopped:
                    raise
                except (RunError, ValueError, RuntimeError, OSError) as exc:
                    record.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                    status = "failed: " + record["error"]
                    if not isinstance(exc, (RunError, ValueError)):
                        traceback.print_exc()
                runs.append(record)
                echo(f"[{len(runs)}/{total}] {method} {name}: {status}")
    results = _tables(base_cfg, runs, target_list, seeds, methods)
    os.makedirs(root_dir, exist_ok=True)
    with open(os.path.join(root_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(root_dir, "results.md"), "w") as f:
        f.write(results["markdown"])
    return results


def _tables(cfg, runs, target_list, seeds, methods):
    metric_names = ["test"] + (["open"] if cfg.task in ("open_class", "in_the_wild") else []) + \
        (["harmonic"] if cfg.task == "open_class" else [])
    labels = {"test": "base" if cfg.task != "domain_shift" else "test", "open": "new" if cfg.task == "open_class"
              else "open", "harmonic": "H"}
    table = {}
    for method, _ in methods:
        for target in target_list:
            ok = [r for r in runs if r["method"] == method and r["target"] == target and r["status"] == "ok"]
            cell = {}
            for model in MODELS:
                for metric in metric_names:
                    cell[f"{model}/{metric}"] = _mean_std([r["metrics"].get(model, {}).get(metric) for r in ok])
            cell["seconds_per_step"] = _mean_std([r["summary"].get("seconds_per_step") for r in ok])
            cell["failed"] = [f"seed {r['seed']}: {r['error']}" for r in runs if r["method"] == method
                              and r["target"] == target and r["status"] == "failed"]
            table[(method, target)] = cell
    lines = [f"# {cfg.data.dataset} ({cfg.task}), seeds {', '.join(map(str, seeds))}", ""]
    head = ["target"] + [f"{model} {labels[m]}" for model in MODELS for m in metric_names]
    baseline = len(methods) > 1
    if baseline:
        head += ["CLIPood best test", "gain (best)", "step time ÷ CLIPood"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    averages = {}
    for target in target_list + ["average"]:
        if target == "average":
            def cell_of(method, key):
                means = [table[(method, t)][key][0] for t in target_list if table[(method, t)][key]]
                return (statistics.fmean(means), 0.0) if len(means) == len(target_list) else None
        else:
            def cell_of(method, key, target=target):
                return table[(method, target)][key]
        row = [str(target) if target is not None else cfg.data.dataset]
        for model in MODELS:
            for metric in metric_names:
                value = cell_of("alignclip", f"{model}/{metric}")
                averages[(target, model, metric)] = value
                row.append(_fmt(value) if target != "average" or value is None else f"{value[0]:.2f}")
        if baseline:
            ours, theirs = cell_of("alignclip", "best/test"), cell_of("clipood", "best/test")
            t_ours, t_theirs = cell_of("alignclip", "seconds_per_step"), cell_of("clipood", "seconds_per_step")
            row += [_fmt(theirs) if target != "average" or theirs is None else f"{theirs[0]:.2f}",
                    f"{ours[0] - theirs[0]:+.2f}" if ours and theirs else "–",
                    f"{t_ours[0] / t_theirs[0]:.3f}" if t_ours and t_theirs and t_theirs[0] > 0 else "–"]
        lines.append("| " + " | ".join(row) + " |")
    failures = [f"- {method} target {target}: {msg}" for (method, target), cell in table.items()
                for msg in cell["failed"]]
    if failures:
        lines += ["", "Failed runs:", *failures]
    lines.append("")
    serializable = {f"{m}/target{t}": v for (m, t), v in table.items()}
    return {"dataset": cfg.data.dataset, "task": cfg.task, "seeds": list(seeds),
            "targets": target_list, "cells": serializable,
            "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs],
            "markdown": "\n".join(lines)}

