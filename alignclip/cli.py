"""`python -m alignclip train | eval | config | sweep | results | pipeline | export`: the training
package's command line.

Every user mistake ends in one `error:` line and exit status 2; a run stopped by SIGTERM or
SIGINT saves a checkpoint, says how to resume and exits with 128 + the signal number.
"""
import argparse
import json
import logging
import os
import sys

from .checkpoint import RunError, checkpoint_file
from .config import ConfigError, load_config
from .data import DataError
from .launchers import LAUNCHERS, SlurmOptions
from .towers import TowerError


def _parser():
    parser = argparse.ArgumentParser(prog="python -m alignclip", description="AlignCLIP training with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=1e-5 (repeatable)")

    tr = sub.add_parser("train", help="train (or resume) a run")
    tr.add_argument("--config", required=True, help="YAML file (see configs/)")
    tr.add_argument("--output-dir", help="overrides output_dir")
    tr.add_argument("--max-steps", type=int, help="stop at this step (absolute: a resumed run stops "
                                                  "where an unbroken one does); the schedule is unchanged")
    mode = tr.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUTPUT_DIR")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in OUTPUT_DIR")
    tr.add_argument("--quiet", action="store_true", help="print only errors and the result table")
    overrides(tr)

    ev = sub.add_parser("eval", help="accuracies of a checkpoint's last, BMA and best towers, zero-shot, or the "
                                     "WiSE-FT interpolation between them")
    ev.add_argument("run", nargs="?", help="a run folder or its checkpoints/last.pt (with --wise-ft also a sweep's "
                                           "folder)")
    ev.add_argument("--checkpoint", help="the same as RUN")
    ev.add_argument("--zero-shot", action="store_true", help="the configuration's CLIP before any training, on "
                                                              "the test sets; writes OUTPUT_DIR/summary.json")
    ev.add_argument("--wise-ft", metavar="START:STOP:STEP", help="evaluate (1 - a) zero-shot + a tuned weights for "
                                                                  "the last and BMA towers, e.g. 0:1:0.1; writes "
                                                                  "wise_ft.json and robustness.png")
    ev.add_argument("--config", help="default: the configuration saved in the checkpoint (--zero-shot: required)")
    ev.add_argument("--output", help="write the accuracies here (default: eval.json beside the run)")
    overrides(ev)

    rs = sub.add_parser("results", help="the paper's tables across data sets from several sweeps' folders")
    rs.add_argument("folders", nargs="+", metavar="DIR", help="sweep output folders (each holds results.json)")
    rs.add_argument("--out", default="tables", metavar="PREFIX", help="writes PREFIX.md, PREFIX.json and PREFIX.tex "
                                                                       "(default: tables)")

    cf = sub.add_parser("config", help="print the fully resolved configuration as YAML")
    cf.add_argument("--config", help="YAML file; default: the authors' defaults")
    overrides(cf)

    sw = sub.add_parser("sweep", help="every target and seed of a config, then results.md/json")
    sw.add_argument("--config", required=True)
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sw.add_argument("--targets", nargs="+", default=["all"], help="target indices or 'all'")
    sw.add_argument("--baseline", action="store_true", help="also run CLIPood (loss.align and loss.sls false)")
    sw.add_argument("--max-steps", type=int)
    sw.add_argument("--output-dir")
    sw.add_argument("--launcher", choices=LAUNCHERS, default="local",
                    help="local: one run after another here; gpus: a subprocess per visible GPU (or --jobs N CPU "
                         "runs) at a time; submitit: a SLURM job per run")
    sw.add_argument("--jobs", type=int, help="gpus launcher: runs at once (default: one per GPU; needed without GPUs)")
    sw.add_argument("--gpus", help="gpus launcher: the GPU indices to use, e.g. 0,1,2 (default: all visible)")
    sw.add_argument("--collect", action="store_true", help="launch nothing: rebuild the table from the run folders")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="an ablation: a variant per value (values read as YAML, [0, 1] stays one); several --grid "
                         "make a product, e.g. --grid loss.aloss=1,5,10")
    slurm = SlurmOptions()
    sw.add_argument("--slurm-partition", help="submitit: the SLURM partition")
    sw.add_argument("--slurm-time", type=int, default=slurm.time_min, help="submitit: minutes per job (a job that "
                                                                              "runs out is requeued and resumes)")
    sw.add_argument("--slurm-gpus", type=int, default=slurm.gpus_per_job, help="submitit: GPUs per job")
    sw.add_argument("--slurm-cpus", type=int, help="submitit: CPUs per job (data workers)")
    sw.add_argument("--slurm-array-parallelism", type=int, default=slurm.array_parallelism,
                    help="submitit: jobs of the array running at once")
    sw.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                    help="submitit: an extra sbatch option, e.g. --slurm-option account=myproj (repeatable)")
    sw.add_argument("--submitit-cluster", choices=("slurm", "local"), default=slurm.cluster,
                    help="local: submitit's local executor runs the same jobs as processes here")
    overrides(sw)

    pl = sub.add_parser("pipeline", help="images/s the training input pipeline delivers here, beside the "
                                         "authors' Compose, and the cores an H200 would need")
    pl.add_argument("--config", required=True)
    pl.add_argument("--steps", type=int, default=20, help="training steps to time (the first is a warm-up)")
    pl.add_argument("--workers", type=int, help="data workers for the in-all figure (default: data.num_workers)")
    pl.add_argument("--json", help="also write the measurements here")
    overrides(pl)

    ex = sub.add_parser("export", help="write a plain open_clip checkpoint of the whole CLIP")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--weights", choices=["bma", "last", "best"], default="bma")
    ex.add_argument("--out", required=True)
    return parser


def _run(args, argv):
    from .run import Stopped, resume_command

    if args.command == "config":
        from .config import COOP_TASKS, resolved_transforms

        cfg = load_config(args.config, args.set)
        print(cfg.to_yaml(), end="")
        if cfg.data.transforms == "auto":
            print(f"# data.transforms auto resolves to {resolved_transforms(cfg)} (the authors' "
                  f"preprocessing for {'CoOp' if cfg.task in COOP_TASKS else 'DomainBed'} data)")
        return 0
    if args.command == "pipeline":
        from .throughput import measure, report

        if args.steps < 2:
            raise ConfigError("--steps must be >= 2 (the first step is a warm-up)")
        if args.workers is not None and args.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {args.workers}")
        result = measure(load_config(args.config, args.set), steps=args.steps, workers=args.workers)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        print(report(result))
        return 0
    if args.command == "export":
        from .clip import MODEL_CONFIGS
        from .export import export

        checkpoint = checkpoint_file(args.checkpoint)
        arch = export(checkpoint, args.weights, args.out)
        own = os.path.exists(os.path.join(MODEL_CONFIGS, f"{arch}.json"))
        register = ("from alignclip.clip import register_model_configs; register_model_configs(); "
                    if own else "")
        print(f"wrote {args.out}; load it with: import open_clip; {register}"
              f"open_clip.create_model({arch!r}, pretrained={args.out!r})"
              + (f"  ({arch} is this package's model config, unknown to plain open_clip)" if own else ""))
        return 0
    if args.command == "results":
        from .tables import collect, markdown, write

        result = collect(args.folders)
        paths = write(result, args.out)
        print(markdown(result), end="")
        print(f"wrote {', '.join(paths)}")
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.max_steps is not None and args.max_steps < 0:
        raise ConfigError("--max-steps must be >= 0")
    try:
        if args.command == "sweep":
            return _sweep(args)
        from .train import train

        overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = load_config(args.config, overrides)
        train(cfg, max_steps=args.max_steps, resume=args.resume, overwrite=args.overwrite,
              echo=lambda line: print(line, flush=True), quiet=args.quiet)
        return 0
    except Stopped as stop:
        again = "re-run the same command to continue" if args.command == "sweep" else "resume with"
        print(f"{stop}\n{again}: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.signum


def _eval(args):
    from .monitor import result_table

    run = args.run or args.checkpoint
    if args.run and args.checkpoint:
        raise ConfigError("eval takes the run once: RUN or --checkpoint, not both")
    if args.zero_shot:
        from .evaluate import zero_shot

        if run or args.wise_ft:
            raise ConfigError("eval --zero-shot takes --config, not a run (for a run's zero-shot point: --wise-ft 0)")
        if not args.config:
            raise ConfigError("eval --zero-shot needs --config (the model and data to evaluate)")
        cfg = load_config(args.config, args.set)
        summary = zero_shot(cfg)
        print(result_table(summary, f"zero-shot {cfg.model.arch} ({os.path.join(cfg.output_dir, 'summary.json')}):"))
        return 0
    if not run:
        raise ConfigError("eval needs a run (RUN or --checkpoint) or --zero-shot --config FILE")
    if args.wise_ft:
        from .wise_ft import parse_alphas, wise_ft

        for result in wise_ft(run, parse_alphas(args.wise_ft), echo=print):
            print(_wise_ft_lines(result))
        return 0
    from .evaluate import evaluate_checkpoint

    checkpoint = checkpoint_file(run)
    cfg = load_config(args.config, args.set) if args.config else None
    results = evaluate_checkpoint(checkpoint, cfg, overrides=args.set)
    out = args.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(result_table(results, f"evaluation of {checkpoint} after {results['steps']} steps ({out}):"))
    return 0


def _wise_ft_lines(result):
    folder = os.path.dirname(os.path.dirname(result["checkpoint"]))
    lines = [f"WiSE-FT {folder} ({os.path.join(folder, 'wise_ft.json')}, robustness.png):",
             "| alpha | last ID | last OOD | BMA ID | BMA OOD |", "| --- | --- | --- | --- | --- |"]
    for last, bma in zip(result["curves"]["last"], result["curves"]["bma"]):
        cells = [f"{last['alpha']:g}"] + ["–" if v is None else f"{v:.2f}"
                                          for v in (last["id"], last["ood"], bma["id"], bma["ood"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sweep(args):
    from .sweep import sweep

    try:
        gpus = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus takes GPU indices like 0,1,2, got {args.gpus!r}") from None
    slurm = SlurmOptions(cluster=args.submitit_cluster, partition=args.slurm_partition, time_min=args.slurm_time,
                         gpus_per_job=args.slurm_gpus, cpus_per_job=args.slurm_cpus,
                         array_parallelism=args.slurm_array_parallelism, options=list(args.slurm_option))
    try:
        results = sweep(args.config, seeds=args.seeds, targets=args.targets, baseline=args.baseline,
                        max_steps=args.max_steps, overrides=args.set, output_dir=args.output_dir,
                        echo=lambda line: print(line, flush=True), launcher=args.launcher, jobs=args.jobs,
                        gpus=gpus, slurm=slurm, collect=args.collect, grid=args.grid)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
    print(results["markdown"])
    counts = {}
    for run in results["runs"]:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    if counts.get("ok", 0) == len(results["runs"]):
        return 0
    said = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "ok")
    print(f"{len(results['runs']) - counts.get('ok', 0)} of {len(results['runs'])} runs are not final ({said}); "
          f"re-run the same command to continue them", file=sys.stderr)
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:   # the kernels' one-line notes (which attention path a shape took)
        logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("alignclip_kernels").setLevel(logging.INFO)
    try:
        return _run(args, argv)
    except (ConfigError, DataError, RunError, TowerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
