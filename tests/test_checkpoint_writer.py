"""Checkpoints written in the background: the loop goes on while a save is written, one save in
flight, errors re-raised, a SIGKILL during a background write leaves the previous checkpoint
loadable and the run resumes bit for bit; the CLIPood baseline runs its own path alone."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from alignclip.checkpoint import RunError, load
from alignclip.checkpoint_writer import CheckpointWriter, Schedule, background_writer
from tiny_run import tiny_config


def test_save_returns_before_the_write_and_copies_what_it_was_given(tmp_path, monkeypatch):
    import alignclip.checkpoint_writer as cw

    gate, real = threading.Event(), cw.save_atomic
    monkeypatch.setattr(cw, "save_atomic", lambda obj, path: (gate.wait(10), real(obj, path)))
    weights = torch.zeros(4)
    writer = CheckpointWriter()
    writer.save({"w": weights, "nested": [weights, {"n": 3}]}, str(tmp_path / "a.pt"))
    assert writer.busy and not (tmp_path / "a.pt").exists()
    weights += 1                          # training goes on changing the live tensor
    gate.set()
    writer.wait()
    saved = load(str(tmp_path / "a.pt"), required=("w",))
    assert torch.equal(saved["w"], torch.zeros(4)) and saved["nested"][1] == {"n": 3}
    assert not writer.busy


def test_one_save_in_flight_and_errors_come_back(tmp_path, monkeypatch):
    import alignclip.checkpoint_writer as cw

    order = []

    def slow(obj, path):
        order.append(("start", obj["i"]))
        time.sleep(0.2)
        order.append(("end", obj["i"]))

    monkeypatch.setattr(cw, "save_atomic", slow)
    writer = CheckpointWriter()
    for i in range(3):
        writer.save({"i": i, "t": torch.ones(2)}, str(tmp_path / "x.pt"))
    writer.wait()
    assert order == [(kind, i) for i in range(3) for kind in ("start", "end")]

    def failing(obj, path):
        raise RunError("cannot write x.pt: no space left on the device; the previous file, if any, is kept")

    monkeypatch.setattr(cw, "save_atomic", failing)
    writer.save({"t": torch.ones(1)}, str(tmp_path / "x.pt"))
    with pytest.raises(RunError, match="no space left"):
        writer.wait()
    with pytest.raises(ValueError, match="the block's own"):
        with background_writer() as w:
            w.save({"t": torch.ones(1)}, str(tmp_path / "x.pt"))
            raise ValueError("the block's own error is the one reported")


def test_the_schedule_saves_every_n_steps_and_every_m_minutes(monkeypatch):
    import alignclip.checkpoint_writer as cw

    now = [1000.0]
    monkeypatch.setattr(cw.time, "monotonic", lambda: now[0])
    schedule = Schedule(every=10, minutes=2)
    assert not schedule.due(3, stop=100) and schedule.due(10, stop=100) and not schedule.due(10, stop=10)
    now[0] += 121
    assert schedule.due(11, stop=100)
    schedule.saved()
    assert not schedule.due(12, stop=100)
    assert not Schedule(every=10).due(12, stop=100)


SLOW_WRITER = r"""
import os, sys, time
import alignclip.checkpoint_writer as cw
from alignclip.checkpoint import save_atomic
from alignclip.cli import main
calls = []
def slow(obj, path):
    calls.append(path)
    if path.endswith("last.pt") and len(calls) >= 2:     # the second checkpoint hangs half-written
        with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
            f.write(b"half a checkpoint")
        time.sleep(600)
    save_atomic(obj, path)
cw.save_atomic = slow
sys.exit(main(sys.argv[1:]))
"""


def _weights(path):
    return load(str(path), required=("visual", "bma", "step"))


def test_sigkill_during_a_background_write_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    sets = ["train.epochs=1", "train.iters_per_epoch=12", "train.checkpoint_every=4", "train.attention_images=0",
            "train.select_best=false"]
    config = tmp_path / "run.yaml"
    config.write_text(tiny_config(tmp_path / "data", tmp_path / "out").to_yaml())
    argv = ["train", "--config", str(config), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "out" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (checkpoints / "last.pt").exists() and any(".tmp-" in name for name in os.listdir(checkpoints)):
            break                          # the first checkpoint is written, the second half-way
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _weights(checkpoints / "last.pt")["step"] == 4          # the previous checkpoint, whole
    straight = tmp_path / "straight.yaml"
    straight.write_text(tiny_config(tmp_path / "data", tmp_path / "straight").to_yaml())
    # the resumed run and an unbroken one, side by side
    runs = [subprocess.Popen([sys.executable, "-m", "alignclip", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for args in ([*argv, "--resume"],
                         ["train", "--config", str(straight), *(a for s in sets for a in ("--set", s))])]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
    resumed, unbroken = _weights(checkpoints / "last.pt"), _weights(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert resumed["step"] == unbroken["step"] == 12
    for key in ("visual", "bma"):
        flat = unbroken[key] if key == "visual" else unbroken[key]["module"]
        for name, value in (resumed[key] if key == "visual" else resumed[key]["module"]).items():
            assert torch.equal(value, flat[name]), (key, name)


def test_the_clipood_baseline_runs_the_original_path_alone(tmp_path, torch_path, monkeypatch):
    from alignclip.model import AlignCLIPVisual
    from alignclip.train import train

    calls = []
    real = AlignCLIPVisual._block

    def recorded(self, block, x, x_dv, dual, probe):
        calls.append((dual, probe))
        return real(self, block, x, x_dv, dual, probe)

    monkeypatch.setattr(AlignCLIPVisual, "_block", recorded)
    train(tiny_config(tmp_path / "data", tmp_path / "clipood", "loss.align=false"), max_steps=2)
    assert calls and not any(dual or probe for dual, probe in calls)
    calls.clear()
    train(tiny_config(tmp_path / "data", tmp_path / "alignclip", "train.attention_images=0"), max_steps=1)
    assert any(dual for dual, _ in calls) and any(probe for _, probe in calls)
