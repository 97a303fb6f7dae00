"""The work counter: exact counts on a kernel whose work is known, and the budgets at the paper's
shapes (bf16, sm_90 configurations, ViT-B/16 and K in {7, 65}), equal to the committed full
count."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from alignclip_kernels import work
from alignclip_kernels.kernel_utils import gemv

COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "work.json")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the counter runs under the Triton interpreter")


@triton.jit
def kernel(X, Y, Out, N):
    offs = tl.arange(0, 16)
    x = tl.load(X + offs[:, None] * 16 + offs[None, :], mask=(offs < N)[:, None], other=0.0)
    y = tl.load(Y + offs[:, None] * 16 + offs[None, :])
    z = tl.dot(x, y)
    tl.store(Out + offs, gemv(z, tl.sum(y, axis=0)))
    tl.atomic_add(Out + offs, 1.0, mask=offs < 3)


def test_counts_of_a_known_kernel_are_exact():
    x, y, out = torch.randn(16, 16), torch.randn(16, 16), torch.zeros(16)
    with work.Counter() as counter:
        kernel[(2,)](x, y, out, 10)
    (launch,) = counter.launches
    assert launch.kernel == "kernel" and launch.programs == 2
    assert launch.tensor_macs == 2 * 16 * 16 * 16           # padded tile shapes, every program
    assert launch.fma_macs == 2 * 16 * 16                   # the gemv
    assert launch.loaded == 2 * (10 * 16 + 256) * 4          # masked rows are not loaded
    assert launch.stored == 2 * 16 * 4 and launch.atomics == 2 * 3
    assert launch.unique == (10 * 16 + 256 + 16) * 4           # x's touched rows + y + out


def test_quick_run_holds_every_budget(tmp_path):
    out = tmp_path / "work.json"
    res = subprocess.run([sys.executable, "-m", "alignclip_kernels.work", "--quick", "--dtype",
                          "bfloat16", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert not data["failures"]
    cases = {(r["op"], r["case"]): r for r in data["results"]}
    attn = cases[("attention", "ViT-B/16 rows=1 d(rows) d(dv)")]
    assert attn["phases"]["fwd"]["mac_ratio"] <= 1.25 and attn["phases"]["bwd"]["mac_ratio"] <= 1.4
    plain = cases[("attention", "ViT-B/16 rows=0 d(dv)")]
    assert attn["phases"]["fwd"]["macs"] <= 1.02 * plain["phases"]["fwd"]["macs"]
    for op in ("similarity_align", "sls_mms", "token_text_target", "aal_loss"):
        for k in (7, 65):
            r = cases[(op, f"K={k}")]
            assert r["byte_ratio"] <= 1.2, (op, k, r["byte_ratio"])
            assert all(row["programs"] >= 132 for row in r["kernels"]), (op, k)
    assert "| op | case |" in res.stdout
    # The committed full count (README, BENCHMARKS.md) must be today's kernels' count.
    with open(COMMITTED) as f:
        committed = {(r["op"], r["case"], r["dtype"]): r for r in json.load(f)["results"]}
    for r in data["results"]:
        old = committed[(r["op"], r["case"], r["dtype"])]
        for phase, counts in r["phases"].items():
            assert {k: counts[k] for k in ("macs", "unique")} == \
                {k: old["phases"][phase][k] for k in ("macs", "unique")}, \
                f"benchmarks/work.json is stale ({r['op']} {r['case']} {phase}): regenerate it"
