"""Training runs end to end on the tiny model through the public entry points: outputs, exact
resume, preemption by signal, run folders, every failure a one-line error, eval and export from
a checkpoint alone, and a sweep producing its table."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

from alignclip import cli
from alignclip.checkpoint import RunError, load
from alignclip.train import train
from tiny_run import tiny_config
from utils import AtomicRecorder


def _ckpt(path):
    return torch.load(path, weights_only=True)


def _same_weights(a, b):
    assert a["step"] == b["step"]
    for part in ("visual",):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    for key in a["bma"]["module"]:
        assert torch.equal(a["bma"]["module"][key], b["bma"]["module"][key]), key
    assert a["bma"]["weight_sum"] == b["bma"]["weight_sum"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run trained once through the CLI (the PyTorch path), shared by read-only tests."""
    os.environ["TRITON_INTERPRET"] = "0"
    base = tmp_path_factory.mktemp("run")
    cfg = tiny_config(base / "data", base / "out")
    path = base / "run.yaml"
    path.write_text(cfg.to_yaml())
    try:
        assert cli.main(["train", "--config", str(path)]) == 0
    finally:
        os.environ["TRITON_INTERPRET"] = "1" if not torch.cuda.is_available() else "0"
    return base, path, cfg


def test_cli_run_writes_every_output(finished_run):
    base, _, _ = finished_run
    out = base / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) == {"step", "total", "sls", "aal", "sim_align", "train_acc", "lr", "seconds",
                            "images_per_s", "data_wait"}
    assert all(0 <= r["train_acc"] <= 1 and r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in rows)
    ckpt = _ckpt(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 6 and set(ckpt["text"]) == {"train", "val", "test"}
    assert ckpt["text_tower"] is not None        # random-init text tower travels with the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["steps"] == 6 and summary["best_epoch"] in (1, 2)
    assert set(summary) >= {"last", "bma", "best", "seconds_per_step"}
    assert set(summary["best"]) == {"val", "test"}
    assert (out / "attention.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["arch"] == "AlignCLIP-Tiny"


def test_eval_reads_config_and_text_from_the_checkpoint_alone(finished_run, torch_path, capsys):
    base, _, _ = finished_run
    out = base / "out"
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                     "--output", str(base / "eval.json")]) == 0
    evaluated = json.loads((base / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for tag in ("last", "bma", "best"):    # the run's summary skips per-domain splits of reused passes
        assert {k: v for k, v in evaluated[tag].items() if k in summary[tag]} == summary[tag], tag
    assert evaluated["test_domains"] == summary["test_domains"]
    # the run folder names its checkpoint; --set without --config overrides the saved configuration
    assert cli.main(["eval", "--checkpoint", str(out), "--set", "data.targets=[0]",
                     "--output", str(base / "eval0.json")]) == 0
    other = json.loads((base / "eval0.json").read_text())
    names = [d["domain"] for d in summary["test_domains"]["test"]]
    assert [d["domain"] for d in other["test_domains"]["test"]] != names
    assert other["checkpoint"] == str(out / "checkpoints" / "last.pt")


def test_export_round_trips_into_plain_open_clip(finished_run, torch_path, capsys):
    import open_clip

    from alignclip.clip import register_model_configs

    base, _, _ = finished_run
    target = base / "clip.pt"
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(base / "out" / "checkpoints" / "last.pt"),
                     "--weights", "bma", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    snippet = printed.split("load it with: ", 1)[1].split("  (", 1)[0].strip()
    assert "open_clip.create_model('AlignCLIP-Tiny'" in snippet
    # pasted into a plain Python, the printed lines load the file
    subprocess.run([sys.executable, "-c", f"{snippet}"], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, TRITON_INTERPRET="0"))
    register_model_configs()
    clip = open_clip.create_model("AlignCLIP-Tiny", pretrained=str(target)).eval()
    state = load(str(base / "out" / "checkpoints" / "last.pt"))
    images = torch.randn(2, 3, 32, 32)
    from alignclip.clip import build_architecture
    from alignclip.config import from_dict

    trained = build_architecture(from_dict(state["config"]).model)
    trained.visual.load_state_dict(state["bma"]["module"])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), trained.visual(images))
        text = open_clip.get_tokenizer("AlignCLIP-Tiny")(["a photo of a circle."])
        assert clip.encode_text(text).shape == (1, 64)
    with pytest.raises(SystemExit):
        cli.main(["export", "--checkpoint", "x", "--weights", "median", "--out", str(target)])


def test_resume_is_bit_exact_and_max_steps_is_absolute(tmp_path, torch_path, capsys):
    train(tiny_config(tmp_path / "data", tmp_path / "straight"))
    split = tiny_config(tmp_path / "data", tmp_path / "split")
    train(split, max_steps=4)
    assert _ckpt(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 4
    train(split, max_steps=4, resume=True)       # the same command again: nothing more to do
    assert _ckpt(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 4
    train(split, resume=True)
    assert "resumed from step 4" in capsys.readouterr().out
    _same_weights(_ckpt(tmp_path / "straight" / "checkpoints" / "last.pt"),
                  _ckpt(tmp_path / "split" / "checkpoints" / "last.pt"))
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" not in r] == list(range(1, 7)), "no step may appear twice"
    assert [(r["step"], r["tower"]) for r in rows if r.get("eval") == "val" and not r.get("final")] == \
        [(3, "last"), (6, "last")]
    assert {(r["step"], r["tower"]) for r in rows if r.get("final")} == {(6, "last"), (6, "bma"), (6, "best")}


def test_a_run_folder_holds_one_run(tmp_path, torch_path):
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", "train.epochs=1", "train.select_best=false")
    train(cfg, max_steps=1)
    before = (tmp_path / "out" / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match="already holds a run; pass --resume to continue it or --overwrite"):
        train(cfg)
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == before
    changed = tiny_config(tmp_path / "data", tmp_path / "out", "train.epochs=1", "train.select_best=false",
                          "train.lr=0.5", "loss.alpha=0.2")
    with pytest.raises(RunError, match=r"differs from the saved run's in loss.alpha, train.lr"):
        train(changed, resume=True)
    (tmp_path / "out" / "checkpoints" / "last.pt.tmp-4242").write_bytes(b"half")
    train(cfg, resume=True)
    assert not (tmp_path / "out" / "checkpoints" / "last.pt.tmp-4242").exists()
    train(cfg, overwrite=True, max_steps=1)
    assert _ckpt(tmp_path / "out" / "checkpoints" / "last.pt")["step"] == 1


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_bit_exact(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    long = ["train.epochs=1", "train.iters_per_epoch=40", "train.checkpoint_every=100",
            "train.attention_images=0", "train.select_best=false"]
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config(tmp_path / "data", tmp_path / "out").to_yaml())
    # the run's length comes from --set overrides, which the printed resume command must keep
    train_cmd = [sys.executable, "-m", "alignclip", "train", "--config", str(path),
                 *(arg for s in long for arg in ("--set", s))]
    proc = subprocess.Popen(train_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "resume with:" in err and "--resume" in err
    stopped_at = _ckpt(tmp_path / "out" / "checkpoints" / "last.pt")["step"]
    assert 3 <= stopped_at < 40
    pasted = shlex.split(err.split("resume with: ", 1)[1].splitlines()[0])
    subprocess.run(pasted, env=env, check=True, capture_output=True, timeout=600)
    straight = tmp_path / "straight.yaml"
    straight.write_text(tiny_config(tmp_path / "data", tmp_path / "straight", *long).to_yaml())
    subprocess.run([sys.executable, "-m", "alignclip", "train", "--config", str(straight)], env=env,
                   check=True, capture_output=True, timeout=600)
    _same_weights(_ckpt(tmp_path / "straight" / "checkpoints" / "last.pt"),
                  _ckpt(tmp_path / "out" / "checkpoints" / "last.pt"))


def test_training_runs_through_the_interpreted_kernels(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter not active")
    summary = train(tiny_config(tmp_path / "data", tmp_path / "out", "train.epochs=1", "train.iters_per_epoch=2",
                                "train.attention_images=0"))
    assert summary["steps"] == 2
    with AtomicRecorder() as recorder:
        summary = train(tiny_config(tmp_path / "data", tmp_path / "exact", "train.epochs=1", "train.iters_per_epoch=2",
                                    "train.attention_images=0", "train.deterministic=true"))
    assert summary["steps"] == 2 and not torch.are_deterministic_algorithms_enabled()   # restored after the run
    assert len(recorder) > 0 and not [a for a in recorder.atomics if a[1]], "a float atomic in deterministic mode"


def test_non_finite_loss_says_whether_a_checkpoint_is_kept(tmp_path, torch_path, monkeypatch):
    from alignclip import losses

    real = losses.AlignCLIPLoss.forward
    poison = {"at": 2, "calls": 0}

    def poisoned(self, out, labels):
        terms = real(self, out, labels)
        poison["calls"] += 1
        if poison["calls"] == poison["at"]:
            return terms._replace(aal=terms.aal * float("nan"), total=terms.total * float("nan"))
        return terms

    monkeypatch.setattr(losses.AlignCLIPLoss, "forward", poisoned)
    with pytest.raises(RunError, match=r"^step 2: loss term aal is not finite \(nan\); no checkpoint was written yet"):
        train(tiny_config(tmp_path / "data", tmp_path / "a", "train.attention_images=0"))
    poison.update(at=3, calls=0)
    with pytest.raises(RunError, match=r"^step 3: loss term aal is not finite .*; the last checkpoint .*last.pt\) is kept"):
        train(tiny_config(tmp_path / "data", tmp_path / "b", "train.attention_images=0", "train.checkpoint_every=1"))
    assert _ckpt(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 2


def test_corrupt_image_in_a_dataloader_worker_is_named_in_one_line(tmp_path, torch_path, capsys):
    train(tiny_config(tmp_path / "data", tmp_path / "warmup", "train.attention_images=0"), max_steps=0)
    base = tmp_path / "data" / "Synthetic"
    domain = sorted(d for d in base.iterdir() if d.is_dir())[0]
    victims = sorted((domain / sorted(os.listdir(domain))[0]).iterdir())
    for v in victims:
        v.write_bytes(b"not an image")
    cfg = tiny_config(tmp_path / "data", tmp_path / "broken", "data.num_workers=2", "train.attention_images=0")
    with pytest.raises(RunError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith("unreadable image ") and "\n" not in message, message
    assert str(victims[0].parent) in message and ": not an image" in message
    assert "data.skip_corrupt=true" in message
    capsys.readouterr()
    # the failed run made no step: the corrected command runs in the same folder, no --overwrite
    fixed = tiny_config(tmp_path / "data", tmp_path / "broken", "data.skip_corrupt=true", "train.attention_images=0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a skipped image is a line, not a Python warning
        assert train(fixed)["steps"] == 6
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    expected = {f"skipped {v}: not an image (no known image format)" for v in victims}
    assert said and len(said) == len(set(said)) and set(said) <= expected, said   # once per file


FAILURES = [  # (--set overrides, start of the one error line)
    (["data.dataset=PACS"], "error: dataset folder"),
    (["task=open_class", "data.dataset=Nowhere"], "error: data.dataset must be one of"),
    (["model.arch=ViT-Z-99"], "error: model.arch 'ViT-Z-99' is not an open_clip model"),
    (["model.arch=ViT-B-32", "model.pretrained=no_such_tag"], "error: model.pretrained 'no_such_tag' is neither"),
    (["model.arch=ViT-B-32", "model.pretrained=openai"], "error: model.pretrained 'openai': the ViT-B-32 weights are not in the local cache"),
    (["model.aal_layers=[0, 9]"], "error: model.aal_layers [9] out of range"),
    (["model.dual_layers=7"], "error: model.dual_layers 7 exceeds"),
    (["train.device=cuda:7"], "error: train.device"),
    (["data.targets=[9]"], "error: data.targets [9] out of range"),
    (["model.template=a photo of a thing."], "error: config key model.template must be a prompt"),
]


@pytest.mark.parametrize("overrides,start", FAILURES, ids=[" ".join(o) for o, _ in FAILURES])
def test_user_mistakes_end_in_one_error_line(tmp_path, capsys, overrides, start, torch_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config(tmp_path / "data", tmp_path / "out").to_yaml())
    args = ["train", "--config", str(path)] + [x for o in overrides for x in ("--set", o)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(start) and "\n" not in err and "Traceback" not in err, err


def test_bad_checkpoints_are_one_line_errors(tmp_path, finished_run, capsys, torch_path):
    base, _, _ = finished_run
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((base / "out" / "checkpoints" / "last.pt").read_bytes()[:5000])
    other = tmp_path / "other.pt"
    state = _ckpt(base / "out" / "checkpoints" / "last.pt")
    state["visual"] = {k: v[..., :1] if v.dim() else v for k, v in state["visual"].items()}
    torch.save(state, other)
    cases = [(str(tmp_path), "is a folder"), (str(truncated), "cannot be read (truncated"),
             (str(tmp_path / "missing.pt"), "does not exist"), (str(other), "another architecture")]
    for path, match in cases:
        assert cli.main(["eval", "--checkpoint", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and match in err and "\n" not in err, err


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from alignclip.checkpoint import save_atomic

    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, str(path))

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match="cannot write .*last.pt: no space left on the device; the previous"):
        save_atomic({"step": 2}, str(path))
    monkeypatch.undo()
    assert _ckpt(path)["step"] == 1 and not list(tmp_path.glob("*.tmp-*"))


KILLER = r"""
import os, signal, sys, torch
from alignclip.checkpoint import save_atomic
def dying_save(obj, path):
    with open(path, "wb") as f:
        f.write(b"partial checkpoint bytes")
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
    assert _ckpt(path)["step"] == 1


def test_tensorboard_asked_for_and_missing_is_said_once(tmp_path, torch_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    train(tiny_config(tmp_path / "data", tmp_path / "out", "train.logger=tensorboard", "train.attention_images=0"),
          max_steps=2)
    out = capsys.readouterr().out
    assert out.count("tensorboard is not installed") == 1


def test_an_empty_evaluation_set_is_reported_as_null_with_a_warning(tmp_path):
    from alignclip.data.tasks import EvalSet, Task
    from alignclip.evaluate import Evaluator

    cfg = tiny_config(tmp_path / "data", tmp_path / "out")
    task = Task(["a", "b"], [], [], {"val": EvalSet([], ["a", "b"])}, "{}")
    evaluator = Evaluator(task, {"val": torch.eye(2)}, cfg, 32, torch.device("cpu"))
    with pytest.warns(UserWarning, match="evaluation set val is empty"):
        assert evaluator.accuracies({"last": None, "bma": None}, "val") == {"last": None, "bma": None}
