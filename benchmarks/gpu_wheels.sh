#!/usr/bin/env bash
# Run on a CPU machine with a package registry, before a GPU is lent: downloads the wheels the
# lent GPU image lacks (it has Python 3.12, torch, triton, timm, transformers, numpy, pyyaml,
# pytest, pytest-benchmark and hypothesis, but not open_clip and its ftfy) into .whl/, which git
# ignores. Carry that folder with the run:  carry: [".whl"], then  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13"
ls -l .whl
