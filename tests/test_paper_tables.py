"""Every table and figure of the paper from one command each: ablation variants and grids in one
sweep, the tables across data sets (Markdown, JSON, LaTeX), WiSE-FT with both ends exact, the
sweep's ETA per kind of job, `eval` printing the table `train` prints, and figures whose text
stays on the canvas and whose legends cover no data."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from alignclip.config import ConfigError
from alignclip.launchers import Job, Outcome, Tally
from alignclip.sweep import grid_variants, plan, read_variants
from tiny_run import tiny_config


def _config(tmp_path, *overrides, variants=None):
    path = tmp_path / "run.yaml"
    text = tiny_config(tmp_path / "data", tmp_path / "unused", *overrides).to_yaml()
    if variants:
        text += "variants:\n" + "".join(f"  {name}: {body}\n" for name, body in variants.items())
    path.write_text(text)
    return str(path)


def test_variants_and_grid_points_are_methods_with_folders_and_settings(tmp_path):
    config = _config(tmp_path, variants={"aal-only": "{loss: {sls: false}}", "vvv": "{model: {second_path: vvv}}"})
    assert read_variants(config) == {"aal-only": ["loss.sls=false"], "vvv": ["model.second_path=vvv"]}
    grid = grid_variants(["loss.aloss=1,5", "model.aal_layers=[0],[0, 1]"])
    assert list(grid) == ["aloss=1+aal_layers=0", "aloss=1+aal_layers=0-1", "aloss=5+aal_layers=0",
                          "aloss=5+aal_layers=0-1"]
    assert grid["aloss=5+aal_layers=0-1"] == ["loss.aloss=5", "model.aal_layers=[0, 1]"]
    _, root, settings, targets, jobs = plan(config, seeds=[0, 1], targets=["3"], baseline=True, max_steps=None,
                                             overrides=[], output_dir=str(tmp_path / "sweep"),
                                             grid=["loss.aloss=1,5"])
    assert list(settings) == ["zero-shot", "clipood", "alignclip", "aal-only", "vvv", "aloss=1", "aloss=5"]
    assert settings["clipood"] == ["loss.align=false", "loss.sls=false"]
    vvv = [j for j in jobs if j.method == "vvv"]
    assert [os.path.relpath(j.output_dir, root) for j in vvv] == ["vvv/target3-seed0", "vvv/target3-seed1"]
    assert "model.second_path=vvv" in vvv[0].sets


@pytest.mark.parametrize("bad, message", [
    ({"clipood": "{loss: {sls: false}}"}, "variant names must be"),
    ({"a b": "{loss: {sls: false}}"}, "variant names must be"),
    ({"x": "3"}, "variant x must map config sections"),
])
def test_bad_variants_are_refused_in_one_line(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        read_variants(_config(tmp_path, variants=bad))


def test_a_bad_grid_is_refused_in_one_line():
    for option, message in (("loss.aloss", "--grid takes key=v1,v2"), ("loss.aloss=", "no values")):
        with pytest.raises(ConfigError, match=message):
            grid_variants([option])


def test_the_eta_is_estimated_per_kind_of_job():
    lines = []
    jobs = [Job("zero-shot", 0, None, "c", [], "z", zero_shot=True)] + [Job("alignclip", 0, s, "c", [], f"r{s}")
                                                                         for s in range(3)]
    tally = Tally(jobs, 1, lines.append)
    tally.started()
    tally.finished(jobs[0], Outcome(True, started=0.0, finished=10.0))     # a zero-shot job: 10 s
    assert lines[-1].endswith("ETA 0:00:30")      # no training run finished: each taken at the longest mean
    tally.started()
    tally.finished(jobs[1], Outcome(True, started=0.0, finished=100.0))
    assert lines[-1].endswith("ETA 0:03:20")      # two training runs left at 100 s, not at the 55 s mean


def _fake_sweep(folder, dataset, task, targets, methods, per_seed):
    """A sweep's results.json: per (method, target, seed) the BMA tower's metrics."""
    runs = []
    for method in methods:
        for target in targets:
            for seed in ([None] if method == "zero-shot" else [0, 1]):
                tower = "zero_shot" if method == "zero-shot" else "bma"
                runs.append({"method": method, "target": target, "seed": seed, "status": "ok",
                             "metrics": {tower: per_seed(method, target, seed)}, "output_dir": "x"})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"dataset": dataset, "task": task, "targets": targets, "runs": runs}, f)
    return str(folder)


def test_tables_across_data_sets_in_markdown_json_and_latex(tmp_path):
    def domainbed(offset):
        return lambda method, target, seed: {"test": offset + 10 * (method == "alignclip") + target + (seed or 0)}

    pacs = _fake_sweep(tmp_path / "pacs", "PACS", "domain_shift", [0, 1], ["zero-shot", "alignclip"], domainbed(50))
    vlcs = _fake_sweep(tmp_path / "vlcs", "VLCS", "domain_shift", [0, 1, 2], ["zero-shot", "alignclip"], domainbed(70))
    dtd = _fake_sweep(tmp_path / "dtd", "DTD", "open_class", [None], ["alignclip"],
                      lambda m, t, seed: {"test": 80.0 + seed, "open": 60.0, "harmonic": 2 * (80 + seed) * 60 / (140 + seed)})
    imagenet = _fake_sweep(tmp_path / "in", "ImageNet", "imagenet_shift", [None], ["alignclip"],
                           lambda m, t, seed: {"imagenet": 70.0, "imagenet_v2": 62.0, "imagenet_sketch": 48.0,
                                               "imagenet_a": 50.0 + seed, "imagenet_r": 77.0, "ood": 59.25 + seed / 4})
    out = subprocess.run([sys.executable, "-m", "alignclip", "results", pacs, vlcs, dtd, imagenet, "--out",
                          str(tmp_path / "tables")], capture_output=True, text=True, check=True).stdout
    data = json.loads((tmp_path / "tables.json").read_text())
    domainbed_table = next(t for t in data["tables"] if t["task"] == "domain_shift")
    row = next(r for r in domainbed_table["rows"] if r["method"] == "alignclip" and r["tower"] == "bma")
    # PACS, seed s: mean over targets 0, 1 of 60 + t + s = 60.5 + s; seeds 0, 1 → 61.0 ± 0.707
    assert row["cells"]["PACS"]["test"]["mean"] == pytest.approx(61.0) and row["cells"]["PACS"]["test"]["n"] == 2
    assert row["cells"]["PACS"]["test"]["std"] == pytest.approx(0.70710678)
    assert row["cells"]["VLCS"]["test"]["mean"] == pytest.approx(81.5)
    assert row["average"]["test"]["mean"] == pytest.approx((61.0 + 81.5) / 2) and row["average"]["test"]["n"] == 2
    zero = next(r for r in domainbed_table["rows"] if r["method"] == "zero-shot")
    assert zero["cells"]["PACS"]["test"] == {"mean": 50.5, "std": None, "n": 1}
    assert "| AlignCLIP | BMA | 61.00 ± 0.71 (n=2) | 81.50 ± 0.71 (n=2) | 71.25 ± 0.71 (n=2) |" in out
    assert "## Open class (base to new)" in out and "| method | tower | DTD base | DTD new | DTD H |" in out
    assert "## ImageNet under distribution shift" in out and "ImageNet OOD avg" in out
    tex = (tmp_path / "tables.tex").read_text()
    assert tex.count("\\begin{tabular}") == 3 and "$61.0 \\pm 0.7$" in tex and "zero-shot CLIP & --" in tex
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "alignclip", "results", str(tmp_path / "nothing")], check=True,
                       capture_output=True)


def test_a_sweep_with_variants_gives_a_row_each_and_the_ablation_figure(tmp_path, torch_path):
    from alignclip.sweep import sweep

    config = _config(tmp_path, "train.epochs=1", "train.iters_per_epoch=2", "train.attention_images=0",
                     variants={"vvv": "{model: {second_path: vvv}}"})
    results = sweep(config, seeds=[0], targets=["3"], output_dir=str(tmp_path / "sweep"), echo=lambda line: None,
                    grid=["loss.aloss=0"])
    rows = {(r["method"], r["tower"]): r for r in results["rows"]}
    assert rows[("vvv", "bma")]["setting"] == ["model.second_path=vvv"]
    assert rows[("aloss=0", "bma")]["setting"] == ["loss.aloss=0"] and rows[("alignclip", "bma")]["setting"] == []
    assert "| method | tower | setting | steps |" in results["markdown"]
    assert (tmp_path / "sweep" / "ablation.png").exists() and (tmp_path / "sweep" / "ablation.pdf").exists()
    again = sweep(config, seeds=[0], targets=["3"], output_dir=str(tmp_path / "sweep"), echo=lambda line: None,
                  grid=["loss.aloss=0"], collect=True)
    assert [r["status"] for r in again["runs"]] == ["ok"] * 4


def test_wise_ft_ends_are_zero_shot_and_the_tower_exactly(tmp_path, torch_path):
    from alignclip.train import train

    cfg = tiny_config(tmp_path / "data", tmp_path / "run", "train.epochs=1", "train.iters_per_epoch=3",
                      "train.attention_images=0")
    train(cfg)
    run = str(tmp_path / "run")
    printed = subprocess.run([sys.executable, "-m", "alignclip", "eval", run, "--wise-ft", "0:1:0.5"],
                             capture_output=True, text=True, check=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert "| alpha | last ID | last OOD | BMA ID | BMA OOD |" in printed.stdout
    result = json.loads((tmp_path / "run" / "wise_ft.json").read_text())
    assert result["alphas"] == [0.0, 0.5, 1.0]
    assert (tmp_path / "run" / "robustness.png").exists() and (tmp_path / "run" / "robustness.pdf").exists()
    evaluated = subprocess.run([sys.executable, "-m", "alignclip", "eval", run], capture_output=True, text=True,
                               check=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert "| tower | val |" in evaluated.stdout and "{" not in evaluated.stdout       # a table, not JSON
    tuned = json.loads((tmp_path / "run" / "eval.json").read_text())
    zero_cfg = tmp_path / "zero.yaml"
    zero_cfg.write_text(cfg.to_yaml().replace(str(tmp_path / "run"), str(tmp_path / "zero")))
    subprocess.run([sys.executable, "-m", "alignclip", "eval", "--zero-shot", "--config", str(zero_cfg)],
                   capture_output=True, check=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    zero = json.loads((tmp_path / "zero" / "summary.json").read_text())["zero_shot"]
    for tower in ("last", "bma"):
        ends = {p["alpha"]: p["accuracies"] for p in result["curves"][tower]}
        assert ends[1.0]["test"] == tuned[tower]["test"] and ends[1.0]["val"] == tuned[tower]["val"]
        assert ends[0.0]["test"] == zero["test"]


def _text_and_legends_fit(fig):
    """Everything drawn (text included) inside the canvas; no legend over an axes' data (bars,
    lines, points)."""
    renderer = fig.canvas.get_renderer()
    drawn = fig.get_tightbbox(renderer)                     # inches: the extent of what is drawn
    width, height = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= width + 0.01 and drawn.y1 <= height + 0.01, \
        (drawn, width, height)
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for artist in ax.patches + ax.lines + ax.collections:
                extent = artist.get_window_extent(renderer)
                drawn = artist.get_visible() and all(math.isfinite(v) for v in extent.bounds)   # empty: inf
                assert not (drawn and box.overlaps(extent)), "a legend covers data"


def test_figures_keep_their_text_on_the_canvas_and_legends_off_the_data(tmp_path):
    from alignclip.visualize import save_ablation_figure, save_attention_figure, save_results_figure
    from alignclip.wise_ft import save_robustness_figure

    def run(method, target, seed, value):
        tower = "zero_shot" if method == "zero-shot" else "bma"
        return {"method": method, "target": target, "seed": seed, "status": "ok",
                "metrics": {tower: {"test": value}}}

    long_names = ["a target domain with a long name", "art_painting", "Real World", "location_100"]
    runs = [run(m, t, s, 40 + 10 * i + t + s) for i, m in enumerate(["zero-shot", "clipood", "alignclip", "vvv"])
            for t in range(4) for s in (0, 1)]
    results = {"task": "domain_shift", "dataset": "OfficeHome (a long data set title to wrap)", "targets": [0, 1, 2, 3],
               "target_names": long_names, "runs": runs}
    one_target = {**results, "dataset": "Synthetic", "targets": [0], "target_names": ["stripes"],
                  "runs": [r for r in runs if r["target"] == 0]}      # the narrowest figure: one column
    figures = [save_results_figure(str(tmp_path / "results.png"), results),
               save_ablation_figure(str(tmp_path / "ablation.png"), results),
               save_results_figure(str(tmp_path / "one.png"), one_target),
               save_ablation_figure(str(tmp_path / "one-ablation.png"), one_target)]
    curve = [{"alpha": a, "id": 60 + 30 * a, "ood": 50 + 10 * a - 8 * a * a} for a in (0.0, 0.5, 1.0)]
    figures.append(save_robustness_figure(str(tmp_path / "robustness.png"),
                                          [{"method": "alignclip", "curves": {"last": curve, "bma": curve}}],
                                          "WiSE-FT of a run with a rather long name: OfficeHome, α in 0..1"))
    snap = {"images": torch.zeros(2, 3, 32, 32), "attn": torch.rand(2, 4, 4), "target": torch.rand(2, 4, 4) * 40,
            "labels": torch.tensor([0, 1]), "preds": torch.tensor([1, 0]), "layers": [0, 1],
            "set": "target domain: stripes"}

    class Task:
        classnames = ["circle", "square"]

    figures.append(save_attention_figure(str(tmp_path / "attention.png"), snap, snap, "coop", Task))
    for fig in figures:
        fig.canvas.draw()
        _text_and_legends_fit(fig)
    assert all((tmp_path / f"{name}.pdf").exists() for name in ("results", "ablation", "robustness", "attention"))
    attention = figures[-1]
    assert "target domain: stripes" in attention._suptitle.get_text()
    scales = {ax.get_ylim() for ax in attention.axes if ax.get_label() == "<colorbar>"}
    assert len(scales) == 4          # attention and G on scales of their own, per row
