"""A sweep's table, as a paper reports it, from its run records (`sweep.state_of`).

One row per method and tower (zero-shot CLIP first, then CLIPood's and AlignCLIP's last, BMA and
best-epoch towers), one column per target domain (open class: base, new and their harmonic
mean; in the wild: base and open) and their average. A cell is the mean over seeds with the
standard deviation only where there are two seeds or more, and always the seed count; the
per-seed values follow in their own table. Each row names the steps its runs made and the hash
of their configuration; the commits the runs came from are listed. The step-time ratio
AlignCLIP ÷ CLIPood is measured over each run's steady-state steps (its logged windows after
the first, the median seconds a step), paired by target and seed, with its spread. Runs that
are not final (pending, interrupted, failed, refused) are listed, never averaged in.
"""
import statistics

from .run import RunFolder

TOWERS = ("last", "bma", "best")
TOWER_NAMES = {"zero_shot": "–", "last": "last", "bma": "BMA", "best": "best"}
SEED_COLUMNS = {"zero_shot": "zero-shot", "last": "last", "bma": "BMA", "best": "best"}
METHOD_NAMES = {"zero-shot": "zero-shot CLIP", "clipood": "CLIPood", "alignclip": "AlignCLIP"}


SHIFTED = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def metric_names(task):
    return {"domain_shift": ["test"], "in_the_wild": ["test", "open"],
            "open_class": ["test", "open", "harmonic"],
            "imagenet_shift": ["imagenet", *SHIFTED, "ood"]}[task]


def metric_labels(task):
    return {"test": "test" if task == "domain_shift" else "base", "open": "new" if task == "open_class" else "open",
            "harmonic": "H", "imagenet": "ImageNet", "imagenet_v2": "-V2", "imagenet_sketch": "-S",
            "imagenet_a": "-A", "imagenet_r": "-R", "ood": "OOD avg"}


def _derived(row):
    """The harmonic mean of base and new (open class); the mean of the four shifted sets
    (ImageNet, CLIPood's "OOD" column)."""
    if "harmonic" in row:
        b, n = row.get("test"), row.get("open")
        row["harmonic"] = None if b is None or n is None else (2 * b * n / (b + n) if b + n > 0 else 0.0)
    if "ood" in row:
        values = [row.get(k) for k in SHIFTED]
        row["ood"] = None if None in values else sum(values) / len(values)
    return row


def run_metrics(summary, task):
    """{tower: {metric: accuracy}} of a run (or zero-shot) summary."""
    out = {}
    for tower in ("zero_shot", *TOWERS):
        accs = summary.get(tower)
        if not accs:
            continue
        out[tower] = _derived({m: accs.get(m) for m in metric_names(task)})
    return out


def spread(values):
    """(mean, std or None, count) of the values present; None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _cell(stat):
    if stat is None:
        return "–"
    mean, std, n = stat
    return f"{mean:.2f} ± {std:.2f} (n={n})" if std is not None else f"{mean:.2f} (n={n})"


def steady_seconds_per_step(output_dir):
    """The median seconds a step over a run's logged windows after the first (which holds the
    warm-up and compilation), or None with fewer than two such windows."""
    rows = [r for r in RunFolder(output_dir).rows() if "seconds" in r and "step" in r]
    rates = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
             for a, b in zip(rows, rows[1:]) if b["step"] > a["step"]]
    return statistics.median(rates) if len(rates) >= 2 else None


def step_time_ratio(runs):
    """AlignCLIP ÷ CLIPood steady-state seconds a step, paired by (target, seed)."""
    times = {(r["method"], r["target"], r["seed"]): steady_seconds_per_step(r["output_dir"])
             for r in runs if r["status"] == "ok" and r["method"] in ("alignclip", "clipood")}
    ratios = [times[("alignclip", t, s)] / times[("clipood", t, s)] for (m, t, s) in times
              if m == "alignclip" and times[("alignclip", t, s)] and times.get(("clipood", t, s))]
    return {"ratio": spread(ratios), "pairs": len(ratios),
            "seconds_per_step": {m: spread([v for (mm, _, _), v in times.items() if mm == m])
                                 for m in ("alignclip", "clipood")}}


def target_label(target, names, dataset):
    return dataset if target is None else (names[target] if target < len(names) else str(target))


def build(cfg, runs, target_list, seeds, methods, domain_names):
    """The results dict (markdown included) of a sweep's records; `methods` {method: the --set
    overrides that make it} (a variant's are shown beside its rows)."""
    metrics, labels = metric_names(cfg.task), metric_labels(cfg.task)
    names = {t: target_label(t, domain_names, cfg.data.dataset) for t in target_list}
    ok = [r for r in runs if r["status"] == "ok"]
    rows, cells = [], {}
    for method, setting in methods.items():
        towers = ["zero_shot"] if method == "zero-shot" else list(TOWERS)
        mine = [r for r in ok if r["method"] == method]
        for target in target_list:
            of_target = [r for r in mine if r["target"] == target]
            cells[f"{method}/target{target}"] = {
                f"{tower}/{m}": spread([r["metrics"].get(tower, {}).get(m) for r in of_target])
                for tower in towers for m in metrics}
        for tower in towers:
            row = {"method": method, "tower": tower, "steps": sorted({r["steps"] for r in mine}),
                   "config": sorted({r["summary"].get("config_hash") or "?" for r in mine}), "values": {},
                   "setting": [] if method in METHOD_NAMES else list(setting)}
            for m in metrics:
                per_target = [cells[f"{method}/target{t}"][f"{tower}/{m}"] for t in target_list]
                row["values"][m] = per_target
                row["values"][f"{m}/average"] = (statistics.fmean(c[0] for c in per_target)
                                                 if all(per_target) else None)
            rows.append(row)
    step_time = step_time_ratio(runs)
    commits = sorted({r["summary"].get("commit", "not recorded") or "not a git checkout" for r in ok})
    results = {"dataset": cfg.data.dataset, "task": cfg.task, "seeds": list(seeds), "targets": target_list,
               "target_names": [names[t] for t in target_list], "rows": rows, "cells": cells,
               "step_time": step_time, "commits": commits,
               "runs": [{k: v for k, v in r.items() if k != "summary"} for r in runs]}
    results["markdown"] = markdown(cfg, results, runs, metrics, labels, names)
    return results


def markdown(cfg, results, runs, metrics, labels, names):
    targets = results["targets"]
    lines = [f"# {cfg.data.dataset} ({cfg.task.replace('_', ' ')})", "",
             f"Seeds {', '.join(map(str, results['seeds']))}; accuracy (%) on each target's test split, mean ± std "
             "over seeds (std from 2 seeds up), n = seeds finished.", ""]
    multi = len(metrics) > 1
    averaged = len(targets) > 1            # one column set (CoOp's data sets): no average of one
    settings = any(row["setting"] for row in results["rows"])
    head = ["method", "tower"] + (["setting"] if settings else []) + ["steps", "config"]
    for t in targets:
        head += [(f"{names[t]} {labels[m]}" if averaged else labels[m]) if multi else names[t] for m in metrics]
    if averaged:
        head += [f"average {labels[m]}" if multi else "average" for m in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        cells = [METHOD_NAMES.get(row["method"], row["method"]), TOWER_NAMES[row["tower"]]]
        cells += [", ".join(row["setting"]) or "–"] if settings else []
        cells += [", ".join(map(str, row["steps"])) or "–", ", ".join(row["config"]) or "–"]
        for i in range(len(targets)):
            cells += [_cell(row["values"][m][i]) for m in metrics]
        if averaged:
            cells += ["–" if row["values"][f"{m}/average"] is None else f"{row['values'][f'{m}/average']:.2f}"
                      for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| method | target | seed | steps | " +
              " | ".join(SEED_COLUMNS[t] for t in ("zero_shot", *TOWERS)) + " |", "|" + " --- |" * 8]
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    for r in sorted((r for r in runs if r["status"] == "ok"),
                    key=lambda r: (order.get(r["method"], len(order)), str(r["target"]), str(r["seed"]))):
        values = ["–" if tower not in r["metrics"] else
                  " / ".join("–" if r["metrics"][tower].get(m) is None else f"{r['metrics'][tower][m]:.2f}"
                             for m in metrics) for tower in ("zero_shot", *TOWERS)]
        lines.append(f"| {METHOD_NAMES.get(r['method'], r['method'])} | {names[r['target']]} | "
                     f"{'–' if r['seed'] is None else r['seed']} | {r['steps']} | " + " | ".join(values) + " |")
    if multi:
        lines += ["", f"Per-seed cells: {' / '.join(labels[m] for m in metrics)}."]
    st = results["step_time"]
    if st["ratio"]:
        mean, std, n = st["ratio"]
        lines += ["", f"Step time AlignCLIP ÷ CLIPood: {mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
                  + f" over {n} target-seed pair{'s' if n > 1 else ''} (each run's median seconds a step over its "
                  "logged windows after the first)."]
    elif any(r["method"] == "clipood" for r in runs):
        lines += ["", "Step time AlignCLIP ÷ CLIPood: not measured (the runs log fewer than three windows; "
                      "lower train.log_every)."]
    lines += ["", f"Code: {', '.join(results['commits']) or '–'}."]
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (re-run the sweep to retry them):"]
        lines += [f"- {_who(r, names)}: {r['error']}" for r in failed]
    unfinished = [r for r in runs if r["status"] in ("pending", "incomplete", "refused")]
    if unfinished:
        lines += ["", "Not in the table (not final):"]
        lines += [f"- {_who(r, names)}: " + (r["reason"] if r["status"] == "refused" else
                                              f"{r['status']} (step {r.get('steps') or 0} of "
                                              f"{r.get('asked_steps', '?')})") for r in unfinished]
    lines.append("")
    return "\n".join(lines)


def _who(r, names):
    seed = "" if r["seed"] is None else f" seed {r['seed']}"
    return f"{METHOD_NAMES.get(r['method'], r['method'])} {names[r['target']]}{seed}"
