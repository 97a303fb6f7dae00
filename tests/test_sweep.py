"""Sweeps: every launcher (one after another here, concurrent subprocesses, submitit's local
executor) writes the same run folders and the same table; a run killed mid-sweep is resumed by
re-running the command; a run that is not final is never reported; a failing run stops no other."""
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from alignclip import cli
from tiny_run import tiny_config

SWEEP = ["--seeds", "0", "1", "--targets", "2", "3", "--baseline"]


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(base / "data", base / "unused", "train.epochs=1", "train.iters_per_epoch=4",
                      "train.attention_images=0", "train.checkpoint_every=2")
    path = base / "sweep.yaml"
    path.write_text(cfg.to_yaml())
    return base, path


def _sweep(path, out, *extra):
    return cli.main(["sweep", "--config", str(path), *SWEEP, "--output-dir", str(out), *extra])


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def sequential(sweep_config):
    base, path = sweep_config
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")      # the ops' PyTorch path, here and in every subprocess
        assert _sweep(path, base / "local") == 0
    return _results(base / "local")


def test_the_table_names_domains_seeds_steps_and_starts_from_zero_shot(sweep_config, sequential):
    base, _ = sweep_config
    md = (base / "local" / "results.md").read_text()
    names = sequential["target_names"]
    assert len(names) == 2 and all(not n.isdigit() for n in names)
    assert f"| method | tower | steps | config | {names[0]} | {names[1]} | average |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| zero-shot CLIP | – | 0 |")
    assert any(r.startswith("| CLIPood | BMA | 4 |") for r in rows)
    assert any(r.startswith("| AlignCLIP | best | 4 |") for r in rows)
    assert "(n=2)" in md and "± " in md and "Per seed:" in md and "Code: " in md
    per_seed = [r for r in rows if re.match(r"\| (AlignCLIP|CLIPood) \| \w+ \| [01] \| 4 \|", r)]
    assert len(per_seed) == 8
    assert "Step time AlignCLIP ÷ CLIPood" in md
    assert (base / "local" / "results.png").stat().st_size > 5000
    summary = json.loads((base / "local" / "alignclip" / "target2-seed0" / "summary.json").read_text())
    assert summary["test_domains"]["test"][0]["domain"] == names[0]
    assert summary["test_domains"]["test"][0]["images"] > 0 and len(summary["config_hash"]) == 10
    assert {r["status"] for r in sequential["runs"]} == {"ok"} and len(sequential["runs"]) == 10


def _intervals(root):
    """(start, end) of each subprocess run from its train.log."""
    out = []
    for log in root.glob("*/*/train.log"):
        text = log.read_text()
        start = re.findall(r"^== started (\S+)", text, re.M)[-1]
        end = re.findall(r"^== finished (\S+)", text, re.M)[-1]
        out.append(tuple(datetime.datetime.fromisoformat(t) for t in (start, end)))
    return out


def _same_numbers(a, b):
    assert a["cells"] == b["cells"]
    assert [r["metrics"] for r in a["runs"]] == [r["metrics"] for r in b["runs"]]


def test_concurrent_launcher_overlaps_runs_and_gives_the_same_table(sweep_config, sequential, capsys, torch_path):
    base, path = sweep_config
    assert _sweep(path, base / "jobs", "--launcher", "gpus", "--jobs", "2") == 0
    _same_numbers(sequential, _results(base / "jobs"))
    spans = _intervals(base / "jobs")
    assert len(spans) == 10
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans
    progress = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert progress[-1].startswith("[10/10]") and "done 10, running 0, pending 0, failed 0" in progress[-1]
    assert "ETA" in progress[0]


def test_submitit_local_executor_gives_the_same_table(sweep_config, sequential, torch_path):
    pytest.importorskip("submitit")
    base, path = sweep_config
    assert _sweep(path, base / "submitit", "--launcher", "submitit", "--submitit-cluster", "local",
                  "--slurm-time", "30") == 0
    _same_numbers(sequential, _results(base / "submitit"))
    assert list((base / "submitit" / "submitit").glob("*_log.out"))


def _train_pid(marker):
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and any(marker.encode() in part for part in cmd):
            return int(entry)
    return None


def test_a_run_killed_mid_sweep_is_resumed_by_the_same_command(tmp_path, torch_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cfg = tiny_config(tmp_path / "data", tmp_path / "unused", "train.epochs=1", "train.iters_per_epoch=30",
                      "train.checkpoint_every=5", "train.attention_images=0", "train.select_best=false")
    path = tmp_path / "sweep.yaml"
    path.write_text(cfg.to_yaml())
    command = [sys.executable, "-m", "alignclip", "sweep", "--config", str(path), "--seeds", "0",
               "--targets", "2", "3", "--launcher", "gpus", "--jobs", "2", "--output-dir", str(tmp_path / "cut")]
    victim = str(tmp_path / "cut" / "alignclip" / "target2-seed0")
    killed = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if os.path.exists(os.path.join(victim, "checkpoints", "last.pt")):
                pid = _train_pid(f"output_dir={victim}")
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    watcher.join()
    assert killed, "the run ended before it could be killed"
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "killed by SIGKILL" in first.stdout and "not final" in first.stderr
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["cells"]["alignclip/target2"]["bma/test"] is None          # never reported
    assert cut["cells"]["alignclip/target3"]["bma/test"] is not None      # the other run went on
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "failed before: killed by SIGKILL; resuming" in again.stdout
    assert "resumed from step" in (tmp_path / "cut" / "alignclip" / "target2-seed0" / "train.log").read_text()
    assert cli.main(["sweep", "--config", str(path), "--seeds", "0", "--targets", "2", "3",
                     "--output-dir", str(tmp_path / "unbroken")]) == 0
    _same_numbers(json.loads((tmp_path / "unbroken" / "results.json").read_text()),
                  json.loads((tmp_path / "cut" / "results.json").read_text()))


def test_a_run_that_is_not_final_is_never_reported(sweep_config, tmp_path, capsys, torch_path):
    _, path = sweep_config
    out = tmp_path / "honest"
    args = ["sweep", "--config", str(path), "--seeds", "0", "--targets", "2", "--output-dir", str(out)]
    assert cli.main([*args, "--max-steps", "2"]) == 0
    assert _results(out)["rows"][1]["steps"] == [2]
    # asked for the full length: the 2-step run is not final, and collect launches nothing
    assert cli.main([*args, "--collect"]) == 1
    run = next(r for r in _results(out)["runs"] if r["method"] == "alignclip")
    assert run["status"] == "incomplete" and run["steps"] == 2 and run["asked_steps"] == 4
    assert _results(out)["cells"]["alignclip/target2"]["bma/test"] is None
    assert "incomplete (step 2 of 4)" in (out / "results.md").read_text()
    # re-running resumes it to the asked length
    assert cli.main(args) == 0
    assert "finished at 2 of 4 steps; resuming" in capsys.readouterr().out
    assert _results(out)["rows"][1]["steps"] == [4]
    # a shorter sweep over a longer run is refused with the reason, the run kept
    assert cli.main([*args, "--max-steps", "2"]) == 1
    run = next(r for r in _results(out)["runs"] if r["method"] == "alignclip")
    assert run["status"] == "refused" and "finished at 4 steps; the sweep asks for 2" in run["reason"]
    assert json.loads((out / "alignclip" / "target2-seed0" / "summary.json").read_text())["steps"] == 4
    # another configuration in the same folder is refused, not mixed in
    assert cli.main([*args, "--set", "train.lr=0.5"]) == 1
    assert "differs in train.lr" in (out / "results.md").read_text()


def test_a_failing_run_stops_no_other_and_is_named_in_the_table(sweep_config, tmp_path, torch_path):
    _, path = sweep_config
    out = tmp_path / "failing"
    assert cli.main(["sweep", "--config", str(path), "--seeds", "0", "--targets", "2", "9",
                     "--output-dir", str(out)]) == 1
    results = _results(out)
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {"zero-shot", "alignclip"} and all(r["target"] == 9 for r in failed)
    assert all("data.targets [9] out of range" in r["error"] for r in failed)
    assert results["cells"]["alignclip/target2"]["bma/test"] is not None
    assert "data.targets [9] out of range" in (out / "results.md").read_text()


def test_launcher_mistakes_are_one_line(sweep_config, tmp_path, capsys, torch_path):
    _, path = sweep_config
    base = ["sweep", "--config", str(path), "--seeds", "0", "--targets", "2", "--output-dir", str(tmp_path / "x")]
    for extra, message in ((["--launcher", "gpus", "--jobs", "0"], "--jobs must be >= 1"),
                           (["--launcher", "gpus", "--gpus", "a,b"], "--gpus takes GPU indices"),
                           (["--launcher", "submitit", "--slurm-option", "account"], "--slurm-option takes KEY=VALUE"),
                           (["--launcher", "submitit"], "no SLURM here")):
        if message == "no SLURM here" and subprocess.run(["which", "sbatch"], capture_output=True).returncode == 0:
            continue
        capsys.readouterr()
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
