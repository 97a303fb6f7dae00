#!/usr/bin/env bash
# Does the code hold with another Triton release (the lent GPU image runs 3.6)? Shadows the
# installed Triton with VERSION from the registry, then
#   1. compiles every kernel configuration with that release's compiler and ptxas (no spills),
#   2. runs an op under that release's interpreter: it works, or refuses in one line.
#   bash benchmarks/compat_check.sh 3.6.0 [ptxas_report options, e.g. --dtype bfloat16]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:?usage: benchmarks/compat_check.sh TRITON_VERSION [ptxas_report options]}"
shift
DIR="$(mktemp -d)"
python3 -m pip download --no-deps -q -d "$DIR/wheel" "triton==$VERSION"
python3 -m pip install -q --no-deps --no-index --target "$DIR/site" "$DIR"/wheel/*.whl
export PYTHONPATH="$DIR/site:$PWD"
python3 -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
echo "== compiled kernels (ptxas of triton $VERSION)"
TRITON_INTERPRET=0 python3 -m alignclip_kernels.ptxas_report --json "$DIR/ptxas.json" "$@"
echo "== interpreter"
TRITON_INTERPRET=1 python3 - <<'PY'
import torch
import alignclip_kernels as ak
q = torch.randn(1, 2, 40, 32)
try:
    out, _, rows = ak.dual_attention(q, q, q)
    print("interpreter runs the kernels:", tuple(out.shape), tuple(rows.shape))
except RuntimeError as exc:
    print("interpreter refused in one line:", exc)
PY
rm -rf "$DIR"
