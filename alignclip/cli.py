"""`python -m alignclip train|eval ...`: the command line of the training package."""
import argparse
import json
import sys

from .config import ConfigError, load_config
from .data import DataError


def _parser():
    parser = argparse.ArgumentParser(prog="python -m alignclip",
                                     description="AlignCLIP training with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (or resume) a run")
    tr.add_argument("--config", required=True, help="YAML file (see configs/)")
    tr.add_argument("--output-dir", help="overrides output_dir")
    tr.add_argument("--max-steps", type=int, help="stop after this many steps; the schedule is unchanged")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.lr=1e-5 (repeatable)")
    ev = sub.add_parser("eval", help="accuracies of a checkpoint's last and BMA models")
    ev.add_argument("--config", required=True)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--output-dir")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    from .train import RunError, evaluate_checkpoint, train

    try:
        cfg = load_config(args.config, args.set)
        if args.output_dir:
            cfg["output_dir"] = args.output_dir
        if args.command == "train":
            if args.max_steps is not None and args.max_steps < 0:
                raise ConfigError("--max-steps must be >= 0")
            summary = train(cfg, cfg["output_dir"], max_steps=args.max_steps, resume=args.resume)
            if summary is not None:
                print(json.dumps(summary, indent=2))
        else:
            print(json.dumps(evaluate_checkpoint(cfg, args.checkpoint, cfg["output_dir"]), indent=2))
    except (ConfigError, DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
