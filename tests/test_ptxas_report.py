"""GPU readiness on the CPU: every kernel configuration the dispatcher or the autotuner can pick at
the paper's shapes compiles for sm_90a and sm_80, without spills and within shared memory (bf16
compiled here, all dtypes in the committed full report)."""
import json
import os
import subprocess
import sys

import pytest

from alignclip_kernels import roofline

COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "ptxas.json")
KEYS = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
        "wgmma", "default"}


@pytest.fixture(scope="module")
def bf16_rows(tmp_path_factory):
    """The report for the training dtype on both architectures (the full report, all three
    dtypes, takes about 23 minutes of one core: it is committed as benchmarks/ptxas.json)."""
    out = tmp_path_factory.mktemp("ptxas") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "alignclip_kernels.ptxas_report", "--dtype", "bfloat16",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def _check_clean(rows):
    assert rows and all(KEYS <= row.keys() for row in rows)
    kernels = {row["kernel"] for row in rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_main_kernel", "_attn_bwd_dq_kernel", "_sim_fwd_kernel",
            "_sim_bwd_kernel", "_sls_bwd_kernel", "_aal_fwd_kernel", "_target_bwd_kernel"} <= kernels
    assert {row["arch"] for row in rows} == {"sm_90a", "sm_80"}
    assert any(not row["default"] for row in rows), "the autotune candidates must be compiled too"
    for row in rows:
        assert row["error"] is None and row["spill_bytes"] == 0 and row["warps_per_sm"] >= 4, row
    # 16-bit attention matmuls must reach Hopper's tensor-core instruction.
    hopper = [r for r in rows if r["arch"] == "sm_90a" and r["kernel"] == "_attn_fwd_kernel"
              and "fp32" != r["config"].split("ptr=")[1].split("/")[0]]
    assert hopper and all(r["wgmma"] for r in hopper)
    # d(rows) lives outside the backward's loop: at the paper's head dim (64) at most 16 more
    # registers with it than without (12 since the offsets are int64: 124 vs 112 on sm_90a), and
    # at any head dim no lost residency (warps/SM), which is what the registers cost.
    main = {}
    for r in rows:
        if r["kernel"] == "_attn_bwd_main_kernel" and r["default"]:
            key = (r["arch"], r["config"].replace("HAS_DROW=True", "").replace("HAS_DROW=False", ""))
            main.setdefault(key, {})["with" if "HAS_DROW=True" in r["config"] else "without"] = r
    pairs = {key: v for key, v in main.items() if len(v) == 2}
    assert any("BLOCK_D=64 " in config for _, config in pairs), main
    for (arch, config), v in pairs.items():
        assert v["with"]["warps_per_sm"] == v["without"]["warps_per_sm"], (arch, config)
        if "BLOCK_D=64 " in config:
            assert v["with"]["registers"] - v["without"]["registers"] <= 16, (arch, config)


def test_every_bf16_configuration_compiles_without_spills(bf16_rows):
    _check_clean(bf16_rows)


def test_committed_full_report_is_clean_and_current(bf16_rows):
    """benchmarks/ptxas.json, the report over fp32, fp16 and bf16, is spill-free and holds every
    bf16 configuration the kernels compile today (regenerate it when a tile changes)."""
    with open(COMMITTED) as f:
        committed = json.load(f)
    _check_clean(committed)
    assert {"fp32", "fp16", "bf16"} <= {r["config"].split("ptr=")[1].split("/")[0] for r in committed}

    def key(row):
        return row["kernel"], row["arch"], row["config"]

    stale = {key(r) for r in bf16_rows} - {key(r) for r in committed}
    assert not stale, f"benchmarks/ptxas.json is stale; regenerate it: {sorted(stale)[:5]}"


def test_roofline_of_vit_b16_attention_matches_the_design_note():
    fwd = roofline.attention(108, 12, 197, 64, 2)
    # q, k, v 98 MB read, out 33 MB written, ~31 us of memory time at 4.3 TB/s.
    assert abs(fwd.bytes / 1e6 - (98 + 33 + 1 + 1)) < 3
    assert 29e-6 < fwd.bound_s() < 33e-6
    assert roofline.attention(108, 12, 197, 64, 2, write_dv=True).bytes - fwd.bytes == 108 * 12 * 197 * 64 * 2
