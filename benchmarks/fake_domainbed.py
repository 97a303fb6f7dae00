"""Photo-like JPEGs in a DomainBed data set's folder layout, for timing the input pipeline where
the real data set is not at hand (the figures in README.md and BENCHMARKS.md come from these):

    python benchmarks/fake_domainbed.py DIR --dataset PACS --size 227x227 [--classes 7] [--per-class 24]
    python -m alignclip pipeline --config configs/pacs.yaml --set data.root=DIR

Each image is `alignclip.data.synthetic.photo_like`, saved at JPEG quality 90.
"""
import argparse
import os
import sys

from alignclip.data import DATASETS
from alignclip.data.synthetic import photo_like


def write(root, dataset, width, height, classes, per_class):
    folder, domains = DATASETS[dataset]
    seed = 0
    for domain in domains:
        for c in range(classes):
            target = os.path.join(root, folder, domain, f"class{c:02d}")
            os.makedirs(target, exist_ok=True)
            for i in range(per_class):
                photo_like(width, height, seed).save(os.path.join(target, f"{i:04d}.jpg"), quality=90)
                seed += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--dataset", default="PACS", choices=[d for d, (_, domains) in DATASETS.items() if domains])
    parser.add_argument("--size", default="227x227", help="WIDTHxHEIGHT")
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--per-class", type=int, default=24)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    write(args.root, args.dataset, width, height, args.classes, args.per_class)
    print(f"wrote {args.dataset} at {width}x{height} under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
