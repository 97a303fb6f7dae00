"""One command per paper table: every (target domain, seed) of a configuration as its own run,
then `results.md`, `results.json` and `results.png` (`results.py`).

    python -m alignclip sweep --config configs/pacs.yaml [--seeds 0 1 2] [--targets all]
        [--baseline] [--max-steps N] [--launcher local|gpus|submitit] [--jobs N] [--collect]
        [--set key=value ...]

Runs go to OUTPUT_DIR/<method>/target<t>-seed<s> (method: alignclip, or clipood for
`--baseline`, the same configuration with loss.align and loss.sls false: MMS with hard labels
and BMA, nothing of AlignCLIP's), or an ablation's variant: the
configuration file's `variants: {name: {section: {key: value}}}` and the points of
`--grid key=v1,v2,...`, several `--grid` making a product), and the zero-shot evaluation of
the untrained CLIP, once per target, to OUTPUT_DIR/zero-shot/target<t>. With variants the
table gains a row per variant naming the keys it sets, and `ablation.png` their bars per target. Where the runs execute
is the launcher's business (`launchers.py`); what they hold is read back from their folders:
a run finished at the asked length is kept, an interrupted, failed or shorter one (same
configuration) is resumed to the asked length, and one finished longer or under another
configuration is refused with the reason, never reported. So re-running the same command after
a crash, a kill or a preemption continues, and `--collect` rebuilds the table from whatever has
finished, listing what has not.
"""
import itertools
import json
import os
import re

import yaml

from .config import COOP_TASKS, ConfigError, load_config, run_changing_differences
from .data import DATASETS
from .data.domainbed import load_domains
from .data.root import data_config
from .launchers import LAUNCHERS, Job, Local, Processes, SlurmOptions, Submitit, Tally, failure_of, visible_gpus
from .results import build, run_metrics
from .run import RunFolder
from .visualize import save_ablation_figure, save_results_figure

CLIPOOD = ("loss.align=false", "loss.sls=false")


def domain_names(cfg):
    """The data set's domains in sorted order (the target indices' names); [] for CoOp's data
    sets (open class, ImageNet), which have no target domains."""
    if cfg.task in COOP_TASKS:
        return []
    if cfg.data.dataset in DATASETS and DATASETS[cfg.data.dataset][1]:
        return list(DATASETS[cfg.data.dataset][1])
    from .distributed import Dist

    return list(load_domains(data_config(cfg, Dist()).root, cfg.data.dataset)[0])


def targets_of(cfg, requested):
    """Target indices to sweep: `all` (every domain) or the given ones; CoOp's data sets have none."""
    if cfg.task in COOP_TASKS:
        return [None]
    if requested in (None, ["all"]):
        return list(range(len(domain_names(cfg))))
    return [int(t) for t in requested]


def _yaml_value(value):
    """A value as `--set` reads it back (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _flat_sets(mapping, prefix=""):
    """A nested {section: {key: value}} mapping as `--set key=value` strings."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"variant {prefix.rstrip('.') or '?'} must map config sections to values, got {mapping!r}")
    sets = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            sets += _flat_sets(value, f"{prefix}{key}.")
        else:
            sets.append(f"{prefix}{key}={_yaml_value(value)}")
    return sets


def read_variants(config_path):
    """{name: [--set strings]} of the configuration file's `variants:` (ablations), in order."""
    with open(config_path) as f:
        raw = yaml.safe_load(f) or {}
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"config {config_path}: variants must map names to config sections, got {variants!r}")
    reserved = {"zero-shot", "clipood", "alignclip"}
    bad = [name for name in variants
           if str(name) in reserved or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name))]
    if bad:
        raise ConfigError(f"variant names must be letters, digits and _.+- and not {', '.join(sorted(reserved))}: "
                          f"{', '.join(map(str, bad))}")
    for name, sections in variants.items():
        if not isinstance(sections, dict):
            raise ConfigError(f"variant {name} must map config sections to values, e.g. {{loss: {{sls: false}}}}, "
                              f"got {sections!r}")
    return {str(name): _flat_sets(sections) for name, sections in variants.items()}


def grid_variants(grid):
    """`--grid key=v1,v2,...` options (values read as YAML, `[0, 1]` stays one value) as
    variants, their product: {name: [--set strings]}."""
    axes = []
    for option in grid:
        if "=" not in option:
            raise ConfigError(f"--grid takes key=v1,v2,..., got {option!r}")
        key, raw = option.split("=", 1)
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError:
            raise ConfigError(f"--grid {key}: cannot read {raw!r} as values v1,v2,...") from None
        if not values:
            raise ConfigError(f"--grid {key}: no values")
        axes.append([(key.strip(), _yaml_value(v)) for v in values])
    out = {}
    for point in itertools.product(*axes) if axes else ():
        name = "+".join(f"{key.split('.')[-1]}={value}" for key, value in point)
        name = re.sub(r"[^A-Za-z0-9_.+=-]+", "", name.replace(",", "-"))   # a folder name: [0, 1] -> 0-1
        out[name] = [f"{key}={value}" for key, value in point]
    return out


def plan(config_path, *, seeds, targets, baseline, max_steps, overrides, output_dir, grid=()):
    """(base configuration, output folder, methods with their settings, targets, the sweep's jobs).
    Methods: zero-shot CLIP, CLIPood (`--baseline`), AlignCLIP, then the configuration's
    `variants` and the `--grid` points, each a method of its own (its run folders under its name)."""
    base_cfg = load_config(config_path, overrides)
    root_dir = output_dir or base_cfg.output_dir
    methods = [("clipood", list(CLIPOOD))] if baseline else []
    methods.append(("alignclip", []))
    methods += list({**read_variants(config_path), **grid_variants(grid)}.items())
    target_list = targets_of(base_cfg, targets)
    config = os.path.abspath(config_path)

    def sets_of(extra, seed, target, out):
        return [*overrides, *extra, f"seed={seed}", f"output_dir={out}",
                *([] if target is None else [f"data.targets=[{target}]"])]

    jobs = []
    for target in target_list:   # before training, once per target (the first seed's data)
        out = os.path.join(root_dir, "zero-shot", "all" if target is None else f"target{target}")
        jobs.append(Job("zero-shot", target, None, config, sets_of([], seeds[0], target, out), out, zero_shot=True))
    for method, extra in methods:
        for target in target_list:
            for seed in seeds:
                name = f"seed{seed}" if target is None else f"target{target}-seed{seed}"
                out = os.path.join(root_dir, method, name)
                jobs.append(Job(method, target, seed, config, sets_of(extra, seed, target, out), out, max_steps))
    settings = {"zero-shot": [], **dict(methods)}
    return base_cfg, root_dir, settings, target_list, jobs


def _last_logged_step(folder):
    return max((r.get("step", 0) for r in folder.rows()), default=0)


def state_of(job):
    """What the run folder of `job` holds against what the sweep asks for: a record with status
    ok (finished at the asked length), todo (nothing yet, interrupted, failed, or finished
    shorter with the same configuration: it resumes to the asked length) or refused (finished
    longer, or a different configuration: never reported, never overwritten)."""
    record = {"method": job.method, "target": job.target, "seed": job.seed, "output_dir": job.output_dir}
    try:
        cfg = load_config(job.config_path, job.sets)
    except ConfigError as exc:
        return {**record, "status": "refused", "reason": str(exc)}
    asked = 0 if job.zero_shot else cfg.total_steps if job.max_steps is None else min(cfg.total_steps, job.max_steps)
    record["asked_steps"] = asked
    folder = RunFolder(job.output_dir)
    if folder.holds_run() and os.path.exists(folder.config):   # a run that made no step is no run
        with open(folder.config) as f:
            saved = yaml.safe_load(f)
        changed = run_changing_differences(saved, cfg)
        if changed:
            return {**record, "status": "refused", "reason": f"{job.output_dir} holds a run whose configuration "
                    f"differs in {', '.join(changed)}; move it away or sweep into another --output-dir"}
    if os.path.exists(folder.summary):
        with open(folder.summary) as f:
            summary = json.load(f)
        steps = summary.get("steps")
        if steps == asked:
            return {**record, "status": "ok", "steps": steps, "summary": summary,
                    "metrics": run_metrics(summary, cfg.task)}
        if steps is not None and steps > asked:
            return {**record, "status": "refused", "steps": steps,
                    "reason": f"finished at {steps} steps; the sweep asks for {asked} (drop --max-steps, or "
                              "sweep into another --output-dir)"}
        return {**record, "status": "todo", "steps": steps, "detail": f"finished at {steps} of {asked} steps"}
    failed = failure_of(job.output_dir)
    if failed:
        return {**record, "status": "todo", "failed": failed, "steps": _last_logged_step(folder)}
    if folder.holds_run():
        step = _last_logged_step(folder)
        return {**record, "status": "todo", "steps": step, "detail": f"interrupted at step {step} of {asked}"}
    return {**record, "status": "todo", "steps": 0, "detail": "pending"}


def _final(record):
    """A record for the table: todo becomes failed (with its error), incomplete or pending."""
    if record["status"] != "todo":
        return record
    if record.get("failed"):
        return {**record, "status": "failed", "error": record["failed"]}
    status = "pending" if record.get("detail") == "pending" else "incomplete"
    return {**record, "status": status}


def sweep(config_path, *, seeds=(0, 1, 2), targets=None, baseline=False, max_steps=None, overrides=(),
          output_dir=None, echo=print, train=None, launcher="local", jobs=None, gpus=None, slurm=None,
          collect=False, grid=()):
    """Run (or, with `collect`, only read) the sweep and write results.md / results.json under
    the output folder; returns the results dict. `train` is the training function of the local
    launcher (alignclip.train.train by default); `launcher` one of `launchers.LAUNCHERS`."""
    base_cfg, root_dir, settings, target_list, planned = plan(
        config_path, seeds=seeds, targets=targets, baseline=baseline, max_steps=max_steps,
        overrides=overrides, output_dir=output_dir, grid=grid)
    states = [state_of(job) for job in planned]
    todo = [job for job, state in zip(planned, states) if state["status"] == "todo"]
    for job, state in zip(planned, states):
        if state["status"] == "refused":
            echo(f"{job.name}: refused: {state['reason']}")
        elif state["status"] == "ok":
            echo(f"{job.name}: finished before ({state['steps']} steps)")
        elif not collect and state.get("failed"):
            echo(f"{job.name}: failed before: {state['failed']}; resuming")
        elif not collect and state["detail"] != "pending":
            echo(f"{job.name}: {state['detail']}; resuming")
    if todo and not collect:
        runner = make_launcher(launcher, root_dir, train=train, jobs=jobs, gpus=gpus, slurm=slurm, echo=echo)
        echo(f"{len(todo)} of {len(planned)} runs to do, {runner.concurrency} at a time ({launcher} launcher)")
        runner.run(todo, Tally(todo, runner.concurrency, echo))
    runs = [_final(state_of(job)) for job in planned]
    results = build(base_cfg, runs, target_list, seeds, settings, domain_names(base_cfg))
    os.makedirs(root_dir, exist_ok=True)
    with open(os.path.join(root_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(root_dir, "results.md"), "w") as f:
        f.write(results["markdown"])
    save_results_figure(os.path.join(root_dir, "results.png"), results)
    if len(settings) > 3 or any(m not in ("zero-shot", "clipood", "alignclip") for m in settings):
        save_ablation_figure(os.path.join(root_dir, "ablation.png"), results)
    return results


def make_launcher(name, root_dir, *, train=None, jobs=None, gpus=None, slurm=None, echo=print):
    if name == "local":
        return Local(train, echo=echo)
    if name == "gpus":
        return Processes(visible_gpus() if gpus is None else gpus, jobs, echo=echo)
    if name == "submitit":
        return Submitit(root_dir, slurm or SlurmOptions(), echo=echo)
    raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {name!r}")
