#!/usr/bin/env bash
# The one prepared script for a GPU (sized for an H200, at most about 8 minutes): versions,
# the gpu-marked tests, the benchmarks as JSON, the static kernel report, and BENCHMARKS.md with
# its plots. Writes everything under $OUT when set (else ./gpu_check_out). Usable on any CUDA box:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
status=0
{
  date -u
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
if ! "$PY" -c "import alignclip_kernels, alignclip" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[dev]" 2>&1 | tail -3
fi
timeout 240 "$PY" -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
timeout 240 "$PY" -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.txt" || status=1
timeout 120 "$PY" -m alignclip_kernels.inspect --json "$OUT/inspect.json" > "$OUT/inspect.txt" 2>&1 || status=1
if [ -f "$OUT/bench.json" ]; then
  "$PY" benchmarks/report.py "$OUT/bench.json" --inspect "$OUT/inspect.json" --out "$OUT/BENCHMARKS.md" \
    --plots "$OUT/plots" --command "bash benchmarks/gpu_check.sh" || status=1
fi
echo "gpu_check finished with status $status; results in $OUT"
exit $status
