"""`python -m alignclip results DIR [DIR ...]`: the paper's tables across data sets, built from
several sweeps' folders (each holds the `results.json` its sweep wrote):

- DomainBed (domain shift): one column per data set, the mean over its target domains, and the
  average over the data sets;
- in the wild: base and open per data set, and their averages;
- open class (CoOp's data sets): base, new and their harmonic mean H per data set, and the
  averages over data sets;
- ImageNet under distribution shift: ImageNet, -V2, -Sketch, -A, -R and the mean of the four.

A row per method and tower as in each sweep's table (zero-shot CLIP; CLIPood's, AlignCLIP's and
every variant's last, BMA and best-epoch towers). A cell is the mean over seeds ± their standard
deviation (from two seeds up) with n, the seeds counted: for each seed, a data set's value is the
mean over its targets (a seed missing a target is not counted); an average column averages each
seed's values over the data sets (a seed missing a data set is not counted). Written as Markdown,
JSON and a LaTeX `tabular` a paper can paste.
"""
import json
import os
import statistics

from .checkpoint import RunError
from .results import METHOD_NAMES, TOWER_NAMES, TOWERS, metric_labels, metric_names

FAMILIES = {  # task: (title, metrics shown per data set)
    "domain_shift": ("DomainBed (domain shift)", ["test"]),
    "in_the_wild": ("In the wild (base and open classes)", ["test", "open"]),
    "open_class": ("Open class (base to new)", ["test", "open", "harmonic"]),
    "imagenet_shift": ("ImageNet under distribution shift", metric_names("imagenet_shift")),
}


def load_sweep(folder):
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise RunError(f"{folder} holds no results.json: sweep into it, or rebuild its table with "
                       f"`python -m alignclip sweep --config FILE --output-dir {folder} --collect`")
    with open(path) as f:
        return json.load(f)


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def _per_seed(sweep, method, tower, metric):
    """{seed: the data set's value for that seed: the mean over its targets}."""
    targets = sweep["targets"]
    by_seed = {}
    for r in sweep["runs"]:
        if r["status"] == "ok" and r["method"] == method:
            value = r["metrics"].get(tower, {}).get(metric)
            if value is not None:
                by_seed.setdefault(r["seed"], {})[r["target"]] = value
    return {seed: statistics.fmean(v.values()) for seed, v in by_seed.items() if len(v) == len(targets)}


def _rows(sweeps):
    rows = []
    for sweep in sweeps:
        for method in dict.fromkeys(r["method"] for r in sweep["runs"]):
            for tower in (["zero_shot"] if method == "zero-shot" else list(TOWERS)):
                if (method, tower) not in rows:
                    rows.append((method, tower))
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    return sorted(rows, key=lambda mt: (order.get(mt[0], len(order)), rows.index(mt)))


def family_table(task, sweeps):
    """One family's table: {"title", "datasets", "metrics", "rows": [{"method", "tower",
    "cells": {dataset: {metric: spread}}, "average": {metric: spread}}]}."""
    title, metrics = FAMILIES[task]
    datasets = [s["dataset"] for s in sweeps]
    rows = []
    for method, tower in _rows(sweeps):
        cells, seeds_by_metric = {}, {}
        for sweep in sweeps:
            cells[sweep["dataset"]] = {}
            for m in metrics:
                per_seed = _per_seed(sweep, method, tower, m)
                cells[sweep["dataset"]][m] = _spread(list(per_seed.values()))
                seeds_by_metric.setdefault(m, []).append(per_seed)
        average = {}
        for m, per_dataset in seeds_by_metric.items():
            common = set.intersection(*(set(d) for d in per_dataset)) if per_dataset else set()
            average[m] = _spread([statistics.fmean(d[s] for d in per_dataset) for s in common]) \
                if len(per_dataset) > 1 else None
        rows.append({"method": method, "tower": tower, "cells": cells, "average": average})
    return {"task": task, "title": title, "datasets": datasets, "metrics": metrics, "rows": rows}


def collect(folders):
    """The tables of every family the sweeps in `folders` cover, in the order given."""
    sweeps = [load_sweep(f) for f in folders]
    by_task = {}
    for sweep in sweeps:
        by_task.setdefault(sweep["task"], []).append(sweep)
    seen = {}
    for sweep in sweeps:
        key = (sweep["task"], sweep["dataset"])
        if key in seen:
            raise RunError(f"{sweep['dataset']} ({sweep['task']}) is in two of the folders: keep one")
        seen[key] = sweep
    return {"tables": [family_table(task, group) for task, group in by_task.items()],
            "folders": [os.path.abspath(f) for f in folders]}


def _text(spread, latex=False):
    if spread is None:
        return "–"
    mean, std, n = spread["mean"], spread["std"], spread["n"]
    if latex:
        return f"${mean:.1f}" + (f" \\pm {std:.1f}" if std is not None else "") + "$"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={n})"


def _columns(table):
    labels = metric_labels(table["task"])
    multi = len(table["metrics"]) > 1
    columns = [(d, m, f"{d} {labels[m]}" if multi else d) for d in table["datasets"] for m in table["metrics"]]
    if len(table["datasets"]) > 1:
        columns += [(None, m, f"average {labels[m]}" if multi else "average") for m in table["metrics"]]
    return columns


def _cells(table, row, latex=False):
    return [_text(row["cells"][d][m] if d is not None else row["average"][m], latex) for d, m, _ in _columns(table)]


def markdown(result):
    lines = ["# Results across data sets", "",
             "Accuracy (%): for each seed the mean over a data set's targets, then the mean ± std over "
             "seeds (std from 2 seeds up), n = seeds counted.", ""]
    for table in result["tables"]:
        head = ["method", "tower"] + [label for _, _, label in _columns(table)]
        lines += [f"## {table['title']}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for row in table["rows"]:
            lines.append("| " + " | ".join([METHOD_NAMES.get(row["method"], row["method"]),
                                            TOWER_NAMES[row["tower"]], *_cells(table, row)]) + " |")
        lines.append("")
    lines.append("Sweeps: " + ", ".join(result["folders"]) + ".")
    return "\n".join(lines) + "\n"


def _latex_escape(text):
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def latex(result):
    """One `tabular` per table (plain \\hline rules: no package needed)."""
    parts = []
    for table in result["tables"]:
        columns = _columns(table)
        parts += [f"% {table['title']}: mean $\\pm$ std over seeds", "\\begin{tabular}{ll" + "c" * len(columns) + "}",
                  "\\hline", " & ".join(["Method", "Tower", *(_latex_escape(c[2]) for c in columns)]) + r" \\",
                  "\\hline"]
        for row in table["rows"]:
            parts.append(" & ".join([_latex_escape(METHOD_NAMES.get(row["method"], row["method"])),
                                     TOWER_NAMES[row["tower"]].replace("–", "--"), *_cells(table, row, latex=True)])
                         .replace("–", "--") + r" \\")
        parts += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(parts)


def write(result, prefix):
    """PREFIX.md, PREFIX.json and PREFIX.tex; returns the three paths."""
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    paths = [f"{prefix}.md", f"{prefix}.json", f"{prefix}.tex"]
    with open(paths[0], "w") as f:
        f.write(markdown(result))
    with open(paths[1], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths[2], "w") as f:
        f.write(latex(result))
    return paths
