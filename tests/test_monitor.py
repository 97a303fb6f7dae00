"""What a researcher sees while a run works and what it leaves to publish from: the header,
progress and evaluation lines off a terminal, a tqdm bar on one, --quiet, every log row,
curves.png and attention.png, Weights & Biases offline, and the trainer options (warmup,
clipping, accumulation, precision) with exact resume."""
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from alignclip.clip import random_init_notice
from alignclip.config import load_config
from alignclip.step import warmup_cosine
from alignclip.train import train
from tiny_run import tiny_config
from utils import assert_same_tower

TRAIN_KEYS = {"step", "total", "sls", "aal", "sim_align", "train_acc", "lr", "seconds", "images_per_s", "data_wait"}


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A tiny run through the CLI, its output a pipe (not a terminal)."""
    base = tmp_path_factory.mktemp("watched")
    path = base / "run.yaml"
    path.write_text(tiny_config(base / "data", base / "out", "train.log_every=2").to_yaml())
    res = subprocess.run([sys.executable, "-m", "alignclip", "train", "--config", str(path)], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    return base, path, res


def test_off_a_terminal_the_run_prints_its_header_progress_evaluations_and_result(watched):
    base, _, res = watched
    lines = res.stdout.splitlines()
    assert lines[0].startswith("AlignCLIP run: AlignCLIP-Tiny (random weights) on Synthetic (domain shift), 3 classes")
    assert any(x.startswith("  train on: ") and "(24)" in x and "; test on: " in x for x in lines[:4])
    assert any(x.startswith("  steps 0..6 of 6 (2 epochs x 3), batch 4 a domain, cpu, fp32") for x in lines)
    assert f"  output: {base / 'out'}" in lines
    progress = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in progress] == ["2/6", "4/6", "6/6"]
    for field in ("(epoch ", "loss ", "sls ", "train acc ", " img/s", "data wait ", "ETA "):
        assert all(field in x for x in progress), field
    evals = [x for x in lines if x.startswith("eval step ")]
    assert len(evals) == 2 and evals[0].startswith("eval step 3 (epoch 1/2): val ") and "best " in evals[1]
    assert any(x.startswith("result after 6 steps") for x in lines)
    assert "| tower | val |" in res.stdout and "| bma |" in res.stdout and "images" in lines[-1]
    assert "No pretrained weights loaded" not in res.stdout + res.stderr   # the test model is random on purpose


def test_every_log_row_and_the_curves(watched):
    base, _, _ = watched
    rows = _rows(base / "out")
    train_rows = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6] and all(set(r) == TRAIN_KEYS for r in train_rows)
    val = [r for r in rows if r.get("eval") == "val" and not r.get("final")]
    assert [(r["step"], r["tower"]) for r in val] == [(3, "last"), (6, "last")]
    sources = [d for d in val[0]["domains"]]
    assert len(sources) == 3 and all(0 <= v <= 100 for v in val[0]["domains"].values())
    final = {(r["eval"], r["tower"]) for r in rows if r.get("final")}
    assert final == {(s, t) for s in ("val", "test") for t in ("last", "bma", "best")}
    assert (base / "out" / "curves.png").stat().st_size > 10000
    summary = json.loads((base / "out" / "summary.json").read_text())
    assert summary["test_domains"]["test"][0]["images"] == 6 and summary["steps"] == 6
    assert "commit" in summary and len(summary["config_hash"]) == 10


def test_quiet_keeps_only_the_result(tmp_path, watched):
    _, path, _ = watched
    res = subprocess.run([sys.executable, "-m", "alignclip", "train", "--config", str(path), "--quiet",
                          "--output-dir", str(tmp_path / "q")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("result after 6 steps") and "step 2/6" not in res.stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_tqdm_bar_shows_the_same_fields(tmp_path, torch_path, monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    said = []
    train(tiny_config(tmp_path / "data", tmp_path / "out", "train.log_every=2", "train.attention_images=0"),
          echo=said.append)
    bar = screen.getvalue()
    assert "6/6" in bar and "img/s" in bar and "data wait" in bar and "epoch 2/2" in bar and "loss " in bar
    assert not any(line.startswith("step ") for line in said)          # the bar replaces the lines
    assert "eval step 3" in bar and "result after 6 steps" in said[-1]   # written above the bar / at the end


def test_random_weights_asked_for_a_clip_architecture_are_said_in_plain_words():
    notice = random_init_notice(load_config(None, ["model.arch=ViT-B-32", "model.pretrained=null"]).model)
    assert notice.startswith("note: model.pretrained is null, so ViT-B-32 starts from random weights")
    assert "openai" in notice
    assert random_init_notice(load_config(None, ["model.arch=AlignCLIP-Tiny", "model.pretrained=null"]).model) is None
    assert random_init_notice(load_config(None, ["model.arch=ViT-B-32"]).model) is None


def test_attention_figure_shows_class_prediction_and_a_scale_each_for_attention_and_g(watched, tmp_path):
    from types import SimpleNamespace

    from alignclip.visualize import save_attention_figure

    base, _, _ = watched
    before = torch.load(base / "out" / "checkpoints" / "attention_before.pt", weights_only=True)
    assert {"images", "attn", "target", "labels", "preds", "layers", "set"} <= set(before)
    assert before["layers"] == [0, 1] and (base / "out" / "attention.png").stat().st_size > 20000
    assert before["set"] == "target domain: stripes"        # the target's test images, named
    names = ["circle", "square", "triangle"]
    fig = save_attention_figure(tmp_path / "a.png", before, before, "coop", SimpleNamespace(classnames=names))
    rows = len(before["images"])
    panels = [ax for ax in fig.axes if ax.get_images()]
    bars = [ax for ax in fig.axes if not ax.get_images() or ax.get_label() == "<colorbar>"]
    assert len(panels) == 5 * rows and len(bars) == 2 * rows             # attention's and G's colourbars
    assert "target domain: stripes" in fig._suptitle.get_text()
    for r in range(rows):
        row = panels[5 * r:5 * r + 5]
        assert row[0].get_title() == f"class: {names[int(before['labels'][r])]}"
        assert f"pred: {names[int(before['preds'][r])]}" in row[1].get_title()
        # a scale each for the row's attention and G maps (colourbars in the order drawn), each
        # spanning its own maps' values
        for bar, key in zip(bars[2 * r:2 * r + 2], ("attn", "target")):
            low, high = bar.get_ylim()
            assert before[key][r].min() - 1e-6 <= low < high <= before[key][r].max() + 1e-6
        overlay = row[1].get_images()[0].get_array()
        assert overlay.shape[:2] == before["images"].shape[-2:]           # at image resolution


def test_wandb_offline_gets_the_same_rows(tmp_path, torch_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(tmp_path / "data", tmp_path / "out", "train.logger=wandb", "train.attention_images=0",
                      "train.log_every=2"), echo=lambda line: None)
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert wandb.run is None                                             # finished, not left open


def test_warmup_then_cosine():
    f = warmup_cosine(10, 2)
    assert [f(0), f(1)] == [0.5, 1.0] and f(2) == 1.0 and math.isclose(f(6), 0.5) and f(10) == 0.0
    plain = warmup_cosine(8, 0)
    assert plain(0) == 1.0 and math.isclose(plain(4), 0.5)


def _weights(folder):
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["visual"]


def test_accumulation_equals_the_full_batch_and_resumes_exactly(tmp_path, torch_path):
    quiet = dict(echo=lambda line: None)
    common = ["train.attention_images=0", "train.select_best=false", "train.warmup_steps=2", "train.grad_clip=1.0"]
    train(tiny_config(tmp_path / "data", tmp_path / "one", *common), **quiet)
    train(tiny_config(tmp_path / "data", tmp_path / "two", *common, "train.accumulate=2"), **quiet)
    assert_same_tower(_weights(tmp_path / "two"), _weights(tmp_path / "one"), "visual")
    split = tiny_config(tmp_path / "data", tmp_path / "split", *common, "train.accumulate=2")
    train(split, max_steps=4, **quiet)
    train(split, resume=True, **quiet)
    for key, want in _weights(tmp_path / "two").items():
        assert torch.equal(_weights(tmp_path / "split")[key], want), key
    rows = _rows(tmp_path / "one")
    assert rows[0]["lr"] == pytest.approx(1e-3)    # warmup: step 1 of 2 at half, step 2 at the peak
    with pytest.raises(Exception, match="train.accumulate 5 must divide the step's batch of 12 images"):
        train(tiny_config(tmp_path / "data", tmp_path / "bad", *common, "train.accumulate=5"), **quiet)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precisions_train_on_the_cpu(tmp_path, torch_path, precision):
    summary = train(tiny_config(tmp_path / "data", tmp_path / precision, f"train.precision={precision}",
                                "train.attention_images=0"), echo=lambda line: None)
    assert summary["steps"] == 6 and all(0 <= summary[t]["test"] <= 100 for t in ("last", "bma"))
    if precision == "fp16":
        state = torch.load(tmp_path / precision / "checkpoints" / "last.pt", weights_only=True)
        assert state["stepper"]["scaler"]["scale"] > 0
