"""Where the runs of a sweep execute: one after another here, several at once on this machine's
GPUs (or CPU cores), or as SLURM jobs through submitit. Each run is the `train` command in its
own run folder, so every launcher writes the same folders, a run resumes exactly wherever it
was stopped, and re-running the sweep (or `sweep --collect`) reads the results from the folders.

- `local`: in this process, one run after another (the default).
- `gpus`: one subprocess per run, pinned to one GPU (`CUDA_VISIBLE_DEVICES`) and a share of the
  host cores, the next run starting as one ends; without GPUs, `--jobs N` CPU runs at once.
  Each run's output goes to RUN/train.log.
- `submitit`: each run a job through submitit (`pip install 'alignclip-kernels[slurm]'`), on
  SLURM or, with `cluster: local`, as local processes running the same job objects. A job
  timed out or preempted is requeued by submitit's checkpoint hook and resumes from the run's
  last checkpoint (`train.checkpoint_every` bounds the steps redone).

A run that fails writes RUN/failed.json with its error's one line (removed when the run starts
again); a failing or killed run never stops the others.
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import List, Optional

from .checkpoint import RunError
from .monitor import clock
from .run import Stopped, StopSignals

LAUNCHERS = ("local", "gpus", "submitit")
FAILED_FILE = "failed.json"


@dataclass
class Job:
    """One (method, target, seed) run of a sweep: the train command's configuration and folder."""
    method: str
    target: Optional[int]
    seed: int
    config_path: str
    sets: List[str]
    output_dir: str
    max_steps: Optional[int] = None
    zero_shot: bool = False           # evaluate the untrained CLIP instead of training

    @property
    def name(self):
        return f"{self.method} {os.path.basename(self.output_dir)}"

    def argv(self):
        """The command of this run: train, resuming whatever its folder holds (or eval --zero-shot)."""
        sets = [arg for s in self.sets for arg in ("--set", s)]
        if self.zero_shot:
            return [sys.executable, "-m", "alignclip", "eval", "--zero-shot", "--config", self.config_path, *sets]
        steps = [] if self.max_steps is None else ["--max-steps", str(self.max_steps)]
        return [sys.executable, "-m", "alignclip", "train", "--config", self.config_path, *sets, "--resume", *steps]


@dataclass
class Outcome:
    ok: bool
    error: Optional[str] = None
    started: float = 0.0
    finished: float = 0.0


def failure_of(output_dir):
    path = os.path.join(output_dir, FAILED_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["error"]


def _mark_started(job):
    os.makedirs(job.output_dir, exist_ok=True)
    path = os.path.join(job.output_dir, FAILED_FILE)
    if os.path.exists(path):
        os.remove(path)


def _mark_failed(job, error):
    os.makedirs(job.output_dir, exist_ok=True)
    tmp = os.path.join(job.output_dir, FAILED_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"error": error, "time": time.time()}, f)
    os.replace(tmp, os.path.join(job.output_dir, FAILED_FILE))


def one_line(exc):
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def run_in_process(job, train=None, echo=print):
    """Train `job` here; its failure is written to the run folder and re-raised."""
    from .config import load_config

    if train is None:
        from .train import train
    _mark_started(job)
    try:
        cfg = load_config(job.config_path, job.sets)
        if job.zero_shot:
            from .evaluate import zero_shot

            return zero_shot(cfg)
        return train(cfg, max_steps=job.max_steps, resume=True, echo=echo)
    except Stopped:
        raise
    except Exception as exc:
        _mark_failed(job, one_line(exc))
        raise


class Tally:
    """Done / running / pending / failed counts and an ETA estimated per kind of job (zero-shot
    evaluations and training runs take very different times): the jobs left of each kind times
    that kind's mean duration so far (a kind none of whose jobs has finished yet is taken at the
    longest mean seen), spread over the runs at once."""

    def __init__(self, jobs, concurrency, echo):
        self.total, self.concurrency, self.echo = len(jobs), max(1, concurrency), echo
        self.left = {}
        for job in jobs:
            self.left[self.kind(job)] = self.left.get(self.kind(job), 0) + 1
        self.done = self.failed = self.running = 0
        self.durations = {}

    @staticmethod
    def kind(job):
        return "zero-shot" if job.zero_shot else "train"

    def started(self):
        self.running += 1

    def eta(self):
        means = {k: sum(v) / len(v) for k, v in self.durations.items()}
        fallback = max(means.values(), default=0.0)
        work = sum(n * means.get(kind, fallback) for kind, n in self.left.items())
        busy = sum(n for n in self.left.values())
        return work / min(self.concurrency, max(busy, 1))

    def finished(self, job, outcome):
        self.running -= 1
        self.done += outcome.ok
        self.failed += not outcome.ok
        seconds = outcome.finished - outcome.started
        self.durations.setdefault(self.kind(job), []).append(seconds)
        self.left[self.kind(job)] -= 1
        pending = self.total - self.done - self.failed - self.running
        left = pending + self.running
        status = "ok" if outcome.ok else f"failed: {outcome.error}"
        self.echo(f"[{self.done + self.failed}/{self.total}] {job.name}: {status} ({seconds:.0f} s) · "
                  f"done {self.done}, running {self.running}, pending {pending}, failed {self.failed}"
                  + (f" · ETA {clock(self.eta())}" if left else ""))


class Local:
    """In this process, one run after another."""
    concurrency = 1

    def __init__(self, train=None, echo=print):
        self.train, self.echo = train, echo

    def run(self, jobs, tally):
        for job in jobs:
            tally.started()
            started = time.time()
            try:
                run_in_process(job, self.train, echo=self.echo)
                outcome = Outcome(True)
            except Stopped:
                raise
            except Exception as exc:
                if not isinstance(exc, (RunError, ValueError)):   # a bug, not a run's refusal: show where
                    traceback.print_exc()
                outcome = Outcome(False, one_line(exc))
            outcome.started, outcome.finished = started, time.time()
            tally.finished(job, outcome)


def visible_gpus():
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def core_slices(count):
    """This process's cores split into `count` contiguous shares (shared when there are fewer)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if count >= len(cores):
        return [[cores[i % len(cores)]] for i in range(count)]
    size = len(cores) // count
    return [cores[i * size:(i + 1) * size] if i < count - 1 else cores[i * size:] for i in range(count)]


def _log_error(path, returncode):
    """The one line a failed train command said (its `error:` line), or how it died."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    lines = []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "stopped by"))]
    last = said[-1] if said else (lines[-1] if lines else "no output")
    return f"exit status {returncode}: {last}"


def _now():
    return datetime.datetime.now().isoformat(timespec="milliseconds")


class Processes:
    """A subprocess per run, `slots` at a time: each slot a GPU (or none) and a share of the cores."""

    def __init__(self, gpus, jobs=None, echo=print):
        if jobs is not None and jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        count = len(gpus) if jobs is None else jobs
        if count < 1:
            raise ValueError("the gpus launcher found no GPU here; --jobs N runs N CPU runs at once")
        self.slots = [{"gpu": gpus[i % len(gpus)] if gpus else None, "cores": cores}
                      for i, cores in enumerate(core_slices(count))]
        self.concurrency = count
        self.echo = echo

    def _start(self, job, slot):
        _mark_started(job)
        env = dict(os.environ, OMP_NUM_THREADS=str(len(slot["cores"])), PYTHONUNBUFFERED="1")
        if slot["gpu"] is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot["gpu"])
        log_path = os.path.join(job.output_dir, "train.log")
        log = open(log_path, "a")
        where = f"GPU {slot['gpu']}" if slot["gpu"] is not None else f"cores {slot['cores']}"
        log.write(f"== started {_now()} {job.name} on {where}: {' '.join(job.argv())}\n")
        log.flush()
        cores = set(slot["cores"])
        proc = subprocess.Popen(job.argv(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores))
                                if hasattr(os, "sched_setaffinity") else None)
        return {"job": job, "proc": proc, "log": log, "log_path": log_path, "started": time.time(), "slot": slot}

    def run(self, jobs, tally):
        pending, running, free = list(jobs), [], list(self.slots)
        with StopSignals() as signals:
            while pending or running:
                while pending and free:
                    running.append(self._start(pending.pop(0), free.pop(0)))
                    tally.started()
                time.sleep(0.1)
                if signals.received:
                    self._stop(running, signals.received)
                for entry in [e for e in running if e["proc"].poll() is not None]:
                    running.remove(entry)
                    free.append(entry["slot"])
                    code = entry["proc"].returncode
                    entry["log"].write(f"== finished {_now()} {entry['job'].name}: exit status {code}\n")
                    entry["log"].close()
                    outcome = Outcome(code == 0, None if code == 0 else _log_error(entry["log_path"], code),
                                      entry["started"], time.time())
                    if not outcome.ok:
                        _mark_failed(entry["job"], outcome.error)
                    tally.finished(entry["job"], outcome)

    def _stop(self, running, signum):
        """Pass the stop on: each run saves a checkpoint and exits; then the sweep stops."""
        for entry in running:
            entry["proc"].send_signal(signum)
        for entry in running:
            entry["proc"].wait()
            entry["log"].close()
        raise SweepStopped(signum)


class SweepStopped(Stopped):
    def __init__(self, signum):
        self.signum, self.step = signum, None
        RuntimeError.__init__(self, f"stopped by {signal.Signals(signum).name}: each running run saved a checkpoint")


@dataclass
class SlurmOptions:
    cluster: str = "slurm"                # slurm | local (submitit's local executor)
    partition: Optional[str] = None
    time_min: int = 24 * 60
    gpus_per_job: int = 1
    cpus_per_job: Optional[int] = None
    array_parallelism: int = 64
    options: List[str] = field(default_factory=list)   # extra sbatch options, KEY=VALUE


class TrainJob:
    """The submitit job of one run; requeued after a timeout or preemption (submitit calls
    `checkpoint`), it resumes the run from its folder."""

    def __init__(self, job):
        self.job = job

    def __call__(self):
        return run_in_process(self.job, echo=lambda line: print(line, flush=True))

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.job))


class Submitit:
    """Each run a job through submitit; the jobs' logs are under OUTPUT_DIR/submitit."""

    def __init__(self, folder, options: SlurmOptions, echo=print):
        try:
            import submitit
        except ImportError:
            raise ValueError("the submitit launcher needs submitit: pip install 'alignclip-kernels[slurm]'") from None
        bad = [option for option in options.options if "=" not in option]
        if bad:
            raise ValueError(f"--slurm-option takes KEY=VALUE (an sbatch option), got {bad[0]!r}")
        if options.cluster == "slurm" and not _has_sbatch():
            raise ValueError("the submitit launcher found no SLURM here (no sbatch on PATH); "
                             "--submitit-cluster local runs the same jobs as local processes")
        self.executor = submitit.AutoExecutor(folder=os.path.join(folder, "submitit"), cluster=options.cluster)
        extra = dict(option.split("=", 1) for option in options.options)
        params = dict(name="alignclip-sweep", timeout_min=options.time_min, gpus_per_node=options.gpus_per_job,
                      tasks_per_node=1, slurm_array_parallelism=options.array_parallelism,
                      slurm_additional_parameters=extra)
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.cpus_per_job:
            params["cpus_per_task"] = options.cpus_per_job
        self.executor.update_parameters(**params)
        self.concurrency = options.array_parallelism
        self.echo = echo

    def run(self, jobs, tally):
        with self.executor.batch():
            submitted = [(job, self.executor.submit(TrainJob(job))) for job in jobs]
        started = time.time()
        self.echo(f"submitted {len(submitted)} jobs: {', '.join(str(s.job_id) for _, s in submitted[:8])}"
                  + (" ..." if len(submitted) > 8 else ""))
        for _ in submitted:
            tally.started()
        waiting = list(submitted)
        while waiting:
            time.sleep(0.5)
            for job, handle in [w for w in waiting if w[1].done()]:
                waiting.remove((job, handle))
                error = None
                if handle.exception() is not None:
                    error = failure_of(job.output_dir)
                    if error is None:       # died before train could say why (killed, out of time)
                        error = _job_error(handle)
                        _mark_failed(job, error)
                tally.finished(job, Outcome(error is None, error, started, time.time()))


def _has_sbatch():
    from shutil import which

    return which("sbatch") is not None


def _job_error(handle):
    exc = handle.exception()
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"job {handle.job_id}: {lines[-1].strip() if lines else type(exc).__name__}"
