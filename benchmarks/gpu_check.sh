#!/usr/bin/env bash
# The one prepared script for a GPU (sized for an H200, at most about 8 minutes): versions,
# the gpu-marked tests, the benchmarks as JSON, the static kernel report, and BENCHMARKS.md with
# its plots. Writes five files under $OUT when set (else ./gpu_check_out): log.txt, bench.json,
# inspect.json, BENCHMARKS.md, plots.tar.gz. Usable on any CUDA machine:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0
{
  date -u
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} 2>&1 | tee "$LOG"
if ! "$PY" -c "import alignclip_kernels, alignclip" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[dev]" 2>&1 | tail -3 | tee -a "$LOG"
fi
echo "== gpu tests" | tee -a "$LOG"
timeout 240 "$PY" -m pytest -q -m gpu tests/ 2>&1 | tee -a "$LOG" || status=1
echo "== benchmarks" | tee -a "$LOG"
timeout 240 "$PY" -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$OUT/bench.json" \
  2>&1 | tee -a "$LOG" || status=1
echo "== static kernel report" | tee -a "$LOG"
timeout 120 "$PY" -m alignclip_kernels.inspect --json "$OUT/inspect.json" 2>&1 | tail -25 | tee -a "$LOG" || status=1
if [ -f "$OUT/bench.json" ]; then
  plots=$(mktemp -d)
  "$PY" benchmarks/report.py "$OUT/bench.json" --inspect "$OUT/inspect.json" --out "$OUT/BENCHMARKS.md" \
    --plots "$plots/plots" --command "bash benchmarks/gpu_check.sh" 2>&1 | tee -a "$LOG" || status=1
  tar -czf "$OUT/plots.tar.gz" -C "$plots" plots && rm -rf "$plots"
fi
echo "gpu_check finished with status $status; results in $OUT" | tee -a "$LOG"
exit $status
