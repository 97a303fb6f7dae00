r"""Weight-space interpolation between the zero-shot and the fine-tuned image tower (WiSE-FT,
Wortsman et al.), the robustness figure fine-tuning papers are judged by:

    θ(α) = (1 − α) · θ_zero-shot + α · θ        (every floating tensor of the image tower)

for a run's last and BMA towers at each α, evaluated on the run's evaluation sets, each image
decoded once for every α and tower (`Evaluator`), against the class text features the run
saved. α = 0 is the zero-shot tower (`eval --zero-shot`: the pretrained weights, or for a run
from random weights the same seed's initialisation) and α = 1 the tower itself (`eval`), exactly:
the weights (1, 0) and (0, 1) reproduce their tensor bit for bit.

    python -m alignclip eval RUN --wise-ft 0:1:0.1        # RUN: a run folder, or a sweep's

writes RUN/wise_ft.json and RUN/robustness.png (PNG and PDF): accuracy under shift against
in-distribution accuracy, the zero-shot point, the last and BMA points and their interpolation
curves. In-distribution and under shift, per task: domain shift and in the wild: the sources'
validation split against the target domains' test split; open class: base against new;
ImageNet: ImageNet's val split against the mean of the shifted sets. On a sweep's folder every
finished run is interpolated, and the sweep's robustness.png shows every method's runs.
"""
import copy
import json
import os

import torch

from .checkpoint import RunError, load, load_weights
from .clip import build_architecture, build_clip
from .config import from_dict
from .data import build_task
from .data.root import data_config
from .distributed import Dist
from .evaluate import Evaluator, image_size
from .results import SHIFTED
from .visualize import COLUMN_WIDTH, fitted_legend, fitted_title, new_figure, save_figure


def parse_alphas(spec):
    """`start:stop:step` (both ends included) or `a,b,c`: the α values, each in [0, 1]."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise RunError(f"--wise-ft takes start:stop:step (e.g. 0:1:0.1) or a,b,c with α in [0, 1], "
                       f"got {spec!r}") from None
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise RunError(f"--wise-ft values must lie in [0, 1], got {values}")
    return sorted(set(values))


def interpolated(zero_shot, tuned, alpha):
    """(1 − α) · θ_zero-shot + α · θ of two state dicts (other tensors: the tuned ones)."""
    return {k: (1.0 - alpha) * zero_shot[k] + alpha * v if v.is_floating_point() else v for k, v in tuned.items()}


def id_ood(task, accuracies):
    """(in-distribution accuracy, accuracy under shift) of one tower's {set: accuracy}."""
    if task in ("domain_shift", "in_the_wild"):
        return accuracies.get("val"), accuracies.get("test")
    if task == "open_class":
        return accuracies.get("test"), accuracies.get("open")
    shifted = [accuracies[k] for k in SHIFTED if accuracies.get(k) is not None]
    return accuracies.get("imagenet"), sum(shifted) / len(shifted) if shifted else None


def zero_shot_tower(cfg, device):
    """The tower a run started from: its pretrained weights, or its seed's initialisation (the
    run seeds torch, then builds its CLIP; building the task draws nothing from torch)."""
    torch.manual_seed(cfg.seed)
    return build_clip(cfg.model, device)[0].visual


def run_wise_ft(checkpoint, alphas, device=None):
    """wise_ft.json's content for one run's checkpoint (written beside the run)."""
    state = load(checkpoint)
    cfg = from_dict(state["config"])
    device = device or torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    task = build_task(data_config(cfg, Dist()), cfg.task, cfg.seed)
    base = zero_shot_tower(cfg, device)
    theta0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tuned = {"last": state["visual"], "bma": state["bma"]["module"]}
    architecture = build_architecture(cfg.model, device).visual
    towers = {}
    for name, weights in tuned.items():
        weights = {k: v.to(device) for k, v in weights.items()}
        for alpha in alphas:
            tower = copy.deepcopy(architecture)
            load_weights(tower, interpolated(theta0, weights, alpha), checkpoint, f"{name} at α={alpha}")
            towers[f"{name}@{alpha}"] = tower
    text = {name: t.to(device) for name, t in state["text"].items()}
    evaluator = Evaluator(task, text, cfg, image_size(architecture), device)
    results = evaluator.evaluate(towers)
    curves = {}
    for name in tuned:
        curves[name] = []
        for alpha in alphas:
            accs = {k: v for k, v in results[f"{name}@{alpha}"].items() if isinstance(v, float) or v is None}
            id_acc, ood_acc = id_ood(cfg.task, accs)
            curves[name].append({"alpha": alpha, "id": id_acc, "ood": ood_acc, "accuracies": accs})
    return {"checkpoint": os.path.abspath(checkpoint), "task": cfg.task, "dataset": cfg.data.dataset,
            "targets": cfg.data.targets, "seed": cfg.seed, "steps": int(state["step"]), "alphas": alphas,
            "curves": curves}


def save_robustness_figure(path, runs, title):
    """OOD against ID accuracy: per run the interpolation curves of its last and BMA towers,
    the zero-shot point (α = 0), the last and BMA points (α = 1); colour by method."""
    from matplotlib import colormaps

    methods = list(dict.fromkeys(r.get("method", "run") for r in runs))
    palette = colormaps["tab10"]
    fig = new_figure(max(COLUMN_WIDTH, 4.2), 3.6)
    ax = fig.subplots()
    handles = {}
    for run in runs:
        color = palette(methods.index(run.get("method", "run")) % 10)
        for tower, style, marker in (("last", "--", "s"), ("bma", "-", "o")):
            points = [(p["id"], p["ood"]) for p in run["curves"][tower] if p["id"] is not None and p["ood"] is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            line, = ax.plot(xs, ys, style, color=color, linewidth=1, alpha=0.8)
            ends = {p["alpha"]: (p["id"], p["ood"]) for p in run["curves"][tower]}
            if 1.0 in ends and None not in ends[1.0]:
                ax.scatter(*ends[1.0], marker=marker, color=color, s=22, zorder=3)
            if 0.0 in ends and None not in ends[0.0]:
                handles["zero-shot (α = 0)"] = ax.scatter(*ends[0.0], marker="*", color="black", s=50, zorder=4)
            handles.setdefault(f"{run.get('method', 'run')} {tower} (α = 1 marked)", line)
    ax.set_xlabel("in-distribution accuracy (%)", fontsize=8)
    ax.set_ylabel("accuracy under shift (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    fitted_title(ax.set_title, title, fig, 8)
    if handles:
        fitted_legend(fig, list(handles.values()), list(handles), 6, 2)
    return save_figure(fig, path)


def _write_run(folder, result, method=None):
    with open(os.path.join(folder, "wise_ft.json"), "w") as f:
        json.dump(result, f, indent=2)
    save_robustness_figure(os.path.join(folder, "robustness.png"), [{**result, "method": method or "run"}],
                           f"WiSE-FT of {os.path.basename(os.path.abspath(folder))}: {result['dataset']}, "
                           f"α in {result['alphas'][0]}..{result['alphas'][-1]}")


def wise_ft(path, alphas, echo=print):
    """Interpolate one run (a run folder or its checkpoint) or every finished run of a sweep's
    folder; returns the results written."""
    from .checkpoint import checkpoint_file

    sweep_results = os.path.join(path, "results.json") if os.path.isdir(path) else None
    if sweep_results and os.path.isfile(sweep_results):
        with open(sweep_results) as f:
            sweep = json.load(f)
        runs = []
        for record in sweep["runs"]:
            if record["status"] != "ok" or record["method"] == "zero-shot":
                continue
            echo(f"WiSE-FT: {record['method']} {os.path.basename(record['output_dir'])}")
            result = run_wise_ft(checkpoint_file(record["output_dir"]), alphas)
            _write_run(record["output_dir"], result, record["method"])
            runs.append({**result, "method": record["method"]})
        if not runs:
            raise RunError(f"{path} holds no finished run to interpolate")
        save_robustness_figure(os.path.join(path, "robustness.png"), runs,
                               f"WiSE-FT of the {sweep['dataset']} sweep: every finished run")
        return runs
    checkpoint = checkpoint_file(path)
    result = run_wise_ft(checkpoint, alphas)
    _write_run(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), result)
    return [result]
