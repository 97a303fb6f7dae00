"""`python -m alignclip train | eval | config | sweep | pipeline | export`: the training package's command line.

Every user mistake ends in one `error:` line and exit status 2; a run stopped by SIGTERM or
SIGINT saves a checkpoint, says how to resume and exits with 128 + the signal number.
"""
import argparse
import json
import sys

from .checkpoint import RunError
from .config import ConfigError, load_config
from .data import DataError
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
    overrides(tr)

    ev = sub.add_parser("eval", help="accuracies of a checkpoint's last, BMA and best towers")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--config", help="default: the configuration saved in the checkpoint")
    ev.add_argument("--output", help="write the accuracies here (default: eval.json beside the run)")
    overrides(ev)

    cf = sub.add_parser("config", help="print the fully resolved configuration as YAML")
    cf.add_argument("--config", help="YAML file; default: the authors' defaults")
    overrides(cf)

    sw = sub.add_parser("sweep", help="every target and seed of a config, then results.md/json")
    sw.add_argument("--config", required=True)
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sw.add_argument("--targets", nargs="+", default=["all"], help="target indices or 'all'")
    sw.add_argument("--baseline", action="store_true", help="also run CLIPood (loss.align false)")
    sw.add_argument("--max-steps", type=int)
    sw.add_argument("--output-dir")
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


def _run(args):
    from .run import Stopped, resume_command

    if args.command == "config":
        from .config import resolved_transforms

        cfg = load_config(args.config, args.set)
        print(cfg.to_yaml(), end="")
        if cfg.data.transforms == "auto":
            print(f"# data.transforms auto resolves to {resolved_transforms(cfg)} (the authors' "
                  f"preprocessing for {'CoOp' if cfg.task == 'open_class' else 'DomainBed'} data)")
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
        from .export import export

        arch = export(args.checkpoint, args.weights, args.out)
        print(f"wrote {args.out}: open_clip.create_model({arch!r}, pretrained={args.out!r})")
        return 0
    if args.command == "eval":
        import os

        from .evaluate import evaluate_checkpoint

        cfg = load_config(args.config, args.set) if args.config or args.set else None
        results = evaluate_checkpoint(args.checkpoint, cfg)
        out = args.output or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))),
                                          "eval.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=2))
        return 0
    if args.max_steps is not None and args.max_steps < 0:
        raise ConfigError("--max-steps must be >= 0")
    try:
        if args.command == "sweep":
            from .sweep import sweep

            sweep(args.config, seeds=args.seeds, targets=args.targets, baseline=args.baseline,
                  max_steps=args.max_steps, overrides=args.set, output_dir=args.output_dir,
                  echo=lambda line: print(line, flush=True))
            return 0
        from .train import train

        overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = load_config(args.config, overrides)
        summary = train(cfg, max_steps=args.max_steps, resume=args.resume, overwrite=args.overwrite)
        if summary is not None:
            print(json.dumps(summary, indent=2))
        return 0
    except Stopped as stop:
        out = args.output_dir or load_config(args.config, args.set).output_dir
        print(f"{stop}\nresume with: {resume_command(args.config, out)}", file=sys.stderr)
        return 128 + stop.signum


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, DataError, RunError, TowerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
