"""Training runs end to end on the tiny model: outputs, evaluation, exact resume, failures."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from alignclip import cli
from alignclip.config import ConfigError, load_config
from alignclip.train import RunError, train
from runs import tiny_config


@pytest.fixture
def torch_path(monkeypatch):
    """Runs the ops' PyTorch path (the interpreter is exercised by the kernel tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _load(path):
    return torch.load(path, weights_only=False)


def test_cli_run_writes_every_output_and_eval_reads_it(tmp_path, torch_path, capsys):
    import yaml

    cfg = tiny_config(tmp_path / "data")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert cli.main(["train", "--config", str(path), "--output-dir", str(out), "--max-steps", "4",
                     "--set", "train.log_every=2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]) == {"step", "loss", "sls", "aal", "sim_align", "lr", "seconds"}
    ckpt = _load(out / "checkpoints" / "last.pt")
    assert set(ckpt) == {"model", "bma", "optimizer", "scheduler", "step", "rng", "config"}
    assert ckpt["step"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["steps"] == 4
    assert set(summary["last"]) == {"val", "test"} and set(summary["bma"]) == {"val", "test"}
    assert (out / "attention.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(["eval", "--config", str(path), "--output-dir", str(out), "--checkpoint",
                     str(out / "checkpoints" / "last.pt")]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["last"] == summary["last"] and evaluated["bma"] == summary["bma"]


def test_training_runs_through_the_interpreted_kernels(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter not active")
    cfg = tiny_config(tmp_path / "data", train={"iters_per_epoch": 2, "attention_images": 0})
    summary = train(cfg, str(tmp_path / "out"))
    assert summary["steps"] == 2


def test_resume_is_bit_exact(tmp_path, torch_path):
    cfg = tiny_config(tmp_path / "data")
    train(cfg, str(tmp_path / "straight"))
    train(cfg, str(tmp_path / "split"), max_steps=3)
    assert _load(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 3
    train(cfg, str(tmp_path / "split"), resume=True)
    a = _load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["bma"]["module"]:
        assert torch.equal(a["bma"]["module"][key], b["bma"]["module"][key]), key
    assert a["bma"]["weight_sum"] == b["bma"]["weight_sum"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


KILLER = r"""
import os, signal, sys, torch
from alignclip.checkpoint import save_atomic
real_save = torch.save
def dying_save(obj, f):
    f.write(b"partial checkpoint bytes")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
save_atomic({"step": 2}, sys.argv[1])
"""


def test_sigkill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    from alignclip.checkpoint import save_atomic

    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, str(path))
    res = subprocess.run([sys.executable, "-c", KILLER, str(path)], cwd=os.getcwd())
    assert res.returncode == -signal.SIGKILL
    assert _load(path)["step"] == 1


def test_non_finite_loss_stops_naming_step_and_term(tmp_path, torch_path, monkeypatch):
    from alignclip import losses

    real = losses.AlignCLIPLoss.forward
    calls = {"n": 0}

    def poisoned(self, out, labels):
        terms = real(self, out, labels)
        calls["n"] += 1
        if calls["n"] == 5:
            return terms._replace(aal=terms.aal * float("nan"), total=terms.total * float("nan"))
        return terms

    monkeypatch.setattr(losses.AlignCLIPLoss, "forward", poisoned)
    cfg = tiny_config(tmp_path / "data")
    with pytest.raises(RunError, match=r"^step 5: loss term aal is not finite"):
        train(cfg, str(tmp_path / "out"))
    assert _load(tmp_path / "out" / "checkpoints" / "last.pt")["step"] == 3


def test_non_finite_gradient_stops_naming_the_step(tmp_path, torch_path, monkeypatch):
    from alignclip import model

    real = model.AlignCLIPVisual.forward
    calls = {"n": 0}

    def poisoned(self, images, align=True):
        out = real(self, images, align)
        calls["n"] += 1
        if calls["n"] == 2:   # finite loss terms, a NaN gradient flowing back from the tokens
            out.tokens.register_hook(lambda g: g * float("nan"))
        return out

    monkeypatch.setattr(model.AlignCLIPVisual, "forward", poisoned)
    cfg = tiny_config(tmp_path / "data", train={"iters_per_epoch": 3, "attention_images": 0})
    with pytest.raises(RunError, match=r"^step 2: the gradient is not finite"):
        train(cfg, str(tmp_path / "out"))


def test_corrupt_image_is_named_in_one_line_or_skipped(tmp_path, torch_path):
    cfg = tiny_config(tmp_path / "data", train={"iters_per_epoch": 3})
    train(cfg, str(tmp_path / "warmup"), max_steps=0)
    base = tmp_path / "data" / "Synthetic"
    domain = sorted(d for d in base.iterdir() if d.is_dir())[0]
    victims = sorted((domain / sorted(os.listdir(domain))[0]).iterdir())
    for v in victims:
        v.write_bytes(b"not an image")
    with pytest.raises(RunError) as err:
        train(cfg, str(tmp_path / "broken"))
    message = str(err.value)
    assert message.startswith("corrupt image: ") and "\n" not in message
    assert str(domain) in message
    cfg["data"]["skip_corrupt"] = True
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        assert train(cfg, str(tmp_path / "skipped"))["steps"] == 3


def test_config_errors_list_what_is_allowed(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key train.learning_rate; allowed here: .*lr"):
        load_config(overrides=["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        load_config(overrides=["train.epochs=ten"])
    with pytest.raises(ConfigError, match="unknown config key optimizer; allowed here: data, loss"):
        load_config(overrides=["optimizer.lr=1"])
    assert load_config(overrides=["train.lr=3e-4"])["train"]["lr"] == 3e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch: 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2


def test_missing_dataset_folder_is_refused_at_start(tmp_path, capsys):
    assert cli.main(["train", "--config", "configs/pacs.yaml", "--set", f"data.root={tmp_path}",
                     "--set", "model.pretrained=null", "--set", "train.device=cpu",
                     "--output-dir", str(tmp_path / "out")]) == 2
    assert f"dataset folder {tmp_path}/PACS does not exist" in capsys.readouterr().err


def test_openai_weights_get_quickgelu(monkeypatch):
    import open_clip

    from alignclip.train import build_clip

    seen = {}
    real = open_clip.create_model

    def fake_create_model(arch, pretrained=None, device=None, force_quick_gelu=False):
        seen[(arch, pretrained)] = force_quick_gelu
        return real("AlignCLIP-Tiny", pretrained=None)

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    build_clip({"model": {"arch": "ViT-B-16", "pretrained": "openai"}}, "cpu")
    build_clip({"model": {"arch": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"}}, "cpu")
    build_clip({"model": {"arch": "ViT-B-16", "pretrained": None}}, "cpu")
    assert seen == {("ViT-B-16", "openai"): True, ("ViT-B-16", "laion2b_s34b_b88k"): False,
                    ("ViT-B-16", None): False}
