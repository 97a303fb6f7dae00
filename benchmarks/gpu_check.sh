#!/usr/bin/env bash
# The one prepared script for a lent GPU (an H200), at most 8 minutes and 7 output files.
#
#   here, once, with a registry:   bash benchmarks/gpu_wheels.sh       (fills .whl/)
#   there:                         bash benchmarks/gpu_check.sh        (carry .whl)
#
# It installs the carried wheels into a folder of its own with pip --no-index (it never
# contacts a registry), puts that folder and the repository on PYTHONPATH and writes under $OUT
# (default ./gpu_check_out): log.txt, versions.txt, gpu_tests.txt, bench.json, tiles.json,
# BENCHMARKS.md, plots.tar.gz. Time budgets per step (seconds, adding up to 480):
#   versions 10 + install 20 + gpu tests 170 + benchmarks 180 + tile sweep 60 + report 20 + slack 20
# The kernels' first calls (compiles, and autotuning on CUDA) fall inside the gpu-test step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PIP_NO_INDEX=1
status=0
step() { echo "== $1 (budget $2 s) $(date -u +%H:%M:%S)" | tee -a "$LOG"; }

step versions 10
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$OUT/versions.txt" >> "$LOG"

step install 20
SITE="$(mktemp -d)"
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$LOG" || status=1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import alignclip_kernels, alignclip, open_clip" >> "$LOG" 2>&1; then
  echo "cannot import the packages; carry the wheels of benchmarks/gpu_wheels.sh (.whl)" | tee -a "$LOG"
  exit 1
fi

step "gpu tests" 170
timeout 170 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider -rs -n 0 > "$OUT/gpu_tests.txt" 2>&1 || status=1
tail -5 "$OUT/gpu_tests.txt" | tee -a "$LOG"

step benchmarks 180
timeout 180 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -rs -n 0 \
  --benchmark-json="$OUT/bench.json" 2>&1 | tail -20 | tee -a "$LOG" || status=1

step "tile sweep and profile" 60
timeout 60 "$PY" benchmarks/attention_tiles.py --out "$OUT/tiles.json" 2>&1 | tee -a "$LOG" || status=1

step report 20
if [ -f "$OUT/bench.json" ]; then
  plots="$(mktemp -d)"
  tiles=(); [ -f "$OUT/tiles.json" ] && tiles=(--tiles "$OUT/tiles.json")
  timeout 20 "$PY" benchmarks/report.py "$OUT/bench.json" --work benchmarks/work.json "${tiles[@]}" \
    --out "$OUT/BENCHMARKS.md" --plots "$plots/plots" --command "bash benchmarks/gpu_check.sh" 2>&1 | tee -a "$LOG" || status=1
  tar -czf "$OUT/plots.tar.gz" -C "$plots" plots && rm -rf "$plots"
fi
echo "gpu_check finished with status $status at $(date -u +%H:%M:%S); results in $OUT" | tee -a "$LOG"
exit $status
