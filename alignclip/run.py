"""A run folder a cluster can trust: one run per folder, resumable exactly, stoppable by a signal.

    OUTPUT_DIR/config.yaml          the resolved configuration (what `python -m alignclip config` prints)
    OUTPUT_DIR/metrics.jsonl        one row per logged step
    OUTPUT_DIR/checkpoints/last.pt  model, BMA, optimizer, schedule, step, RNG, config, text features
    OUTPUT_DIR/checkpoints/best.pt  the image tower at the best epoch (source-domain validation)
    OUTPUT_DIR/summary.json         accuracies of the last, BMA and best models
    OUTPUT_DIR/attention.png        CLS attention and its target before and after training
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

from .checkpoint import RunError
from .config import config_hash, run_changing_differences

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", "attention.png", "curves.png",
             "checkpoints", "tensorboard", "wandb", "train.log", "failed.json")
# files a run that failed before its first step leaves (train.log is the launcher's, kept)
LEFTOVERS = ("config.yaml", "metrics.jsonl", "curves.png", os.path.join("checkpoints", "attention_before.pt"))


class RunFolder:
    def __init__(self, path):
        self.path = path
        self.checkpoints = os.path.join(path, "checkpoints")
        self.last = os.path.join(self.checkpoints, "last.pt")
        self.best = os.path.join(self.checkpoints, "best.pt")
        self.before = os.path.join(self.checkpoints, "attention_before.pt")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.summary = os.path.join(path, "summary.json")
        self.config = os.path.join(path, "config.yaml")

    def holds_run(self):
        """Whether a run made a step here: a checkpoint, a logged step or a summary. What a run
        that failed before its first step left (its config.yaml, the attention snapshot, a
        failure note) is no run: the next run here clears it."""
        if any(os.path.exists(p) for p in (self.last, self.best, self.summary)):
            return True
        return bool(os.path.exists(self.metrics) and os.path.getsize(self.metrics))

    def prepare(self, cfg, resume, overwrite):
        """Check the folder before any work: a new run never mixes with an old one."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunError(f"output_dir {self.path} is a file, not a folder")
        held = self.holds_run()
        if held and not (resume or overwrite):
            raise RunError(f"output_dir {self.path} already holds a run; pass --resume to continue it "
                           "or --overwrite to replace it")
        if overwrite or not held:
            for name in (RUN_FILES if overwrite else LEFTOVERS):
                target = os.path.join(self.path, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
        try:
            os.makedirs(self.checkpoints, exist_ok=True)
            probe = os.path.join(self.path, ".write-test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise RunError(f"output_dir {self.path} is not writable: {exc.strerror}") from None
        for name in os.listdir(self.checkpoints):   # left by a process killed while writing
            if ".tmp-" in name:
                os.remove(os.path.join(self.checkpoints, name))
        if not held or not os.path.exists(self.config):
            with open(self.config, "w") as f:
                f.write(cfg.to_yaml())

    def check_resumable(self, saved_config, cfg):
        """Refuse to resume a run under a configuration that would change what it computes."""
        changed = run_changing_differences(saved_config, cfg)
        if changed:
            raise RunError(f"cannot resume {self.path}: the configuration differs from the saved run's "
                           f"in {', '.join(changed)}")

    def rows(self):
        """The rows of metrics.jsonl ([] before the first)."""
        if not os.path.exists(self.metrics):
            return []
        with open(self.metrics) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics(self, step):
        """Drop logged rows after `step` (they came after the checkpoint a resume starts from) and
        the final evaluation of a run ended early (`--max-steps`): the resumed run goes on."""
        if not os.path.exists(self.metrics):
            return
        kept = [r for r in self.rows() if r.get("step", 0) <= step and not r.get("final")]
        with open(self.metrics, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, row):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_json(self, path, data):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)


def git_commit():
    """The commit of the checkout this package runs from ("+dirty" with local changes), or None
    for an installed copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def provenance(cfg):
    """What a summary needs to say where its numbers came from."""
    return {"config_hash": config_hash(cfg), "commit": git_commit()}


class Stopped(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a checkpoint at `step`."""

    def __init__(self, signum, step, path):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}")


class StopSignals:
    """SIGTERM and SIGINT (preemption, Ctrl-C) only set a flag, read between steps."""

    def __init__(self):
        self.received = None

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def resume_command(argv):
    """The command the user typed (`argv` after `python -m alignclip`), its overrides kept, as
    one that continues: `train` gets --resume in place of --overwrite; a sweep resumes as is."""
    args = [a for a in argv if a != "--overwrite"]
    if args and args[0] == "train" and "--resume" not in args:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "alignclip", *args])
