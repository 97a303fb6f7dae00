"""GPU readiness on the CPU: the kernel configurations the dispatcher or the autotuner can pick
at the paper's shapes compile for sm_90a and sm_80, without spills and within shared memory: a
sample here (every kernel once per dtype and arch, one autotune key's candidates), every one of
them in the committed full report, which must hold today's sample."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from alignclip_kernels import roofline

COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "ptxas.json")
KEYS = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
        "wgmma", "default"}


def run_ended_whole(argv, timeout, env):
    """(exit status or None when cut off, stdout, stderr) of a command run in a process group of
    its own: at the timeout the whole group ends (the report's pool of compiling processes
    too), not only its first process."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory):
    """The sampled report (about 90 configurations: 1.5 minutes of 2 idle cores; the full
    report, about 700, takes 10 to 25 minutes and is committed as benchmarks/ptxas.json)."""
    out = tmp_path_factory.mktemp("ptxas") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    code, stdout, stderr = run_ended_whole([sys.executable, "-m", "alignclip_kernels.ptxas_report", "--sample",
                                            "--json", str(out)], 600, env)
    assert code is not None, "the sampled ptxas report ran past 600 s (its compiling workers were ended)"
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(out.read_text())


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_timeout_ends_the_whole_pool():
    """A command cut off by its timeout leaves none of its pool's workers behind."""
    code = ("import concurrent.futures as f, multiprocessing as m, time\n"
            "pool = f.ProcessPoolExecutor(2, mp_context=m.get_context('fork'))\n"
            "futures = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
            "time.sleep(0.5)\nprint(*pool._processes, flush=True)\ntime.sleep(60)")
    status, out, _ = run_ended_whole([sys.executable, "-c", code], 5, dict(os.environ))
    workers = [int(p) for p in out.split()]
    assert status is None and len(workers) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), workers


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


def _check_rows_cost(rows):
    """d(rows) lives outside the backward's loop: at the paper's head dim (64) at most 16 more
    registers with it than without (12 since the offsets are int64: 124 vs 112 on sm_90a), and
    at any head dim no lost residency (warps/SM), which is what the registers cost."""
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


def test_the_sample_compiles_without_spills_every_kernel_per_dtype_and_arch(sample_rows):
    _check_clean(sample_rows)
    kernels = {row["kernel"] for row in sample_rows}
    for arch in ("sm_90a", "sm_80"):
        for dtype in ("fp32", "fp16", "bf16"):
            have = {r["kernel"] for r in sample_rows if r["arch"] == arch and dtype in r["config"].split("ptr=")[1]}
            assert {"_attn_fwd_kernel", "_attn_bwd_main_kernel", "_sim_bwd_kernel", "_aal_fwd_kernel"} <= have, \
                (arch, dtype)
    assert {"_pixels_kernel", "_pixels_mean_kernel"} <= kernels


def test_committed_full_report_is_clean_and_current(sample_rows):
    """benchmarks/ptxas.json, the report over every configuration, is spill-free and holds
    every configuration the sample compiles today (regenerate it when a kernel or tile changes:
    python -m alignclip_kernels.ptxas_report --json benchmarks/ptxas.json)."""
    with open(COMMITTED) as f:
        committed = json.load(f)
    _check_clean(committed)
    _check_rows_cost(committed)
    assert {"fp32", "fp16", "bf16"} <= {r["config"].split("ptr=")[1].split("/")[0] for r in committed}

    def key(row):
        return row["kernel"], row["arch"], row["config"]

    stale = {key(r) for r in sample_rows} - {key(r) for r in committed}
    assert not stale, f"benchmarks/ptxas.json is stale; regenerate it: {sorted(stale)[:5]}"
    registers = {}
    for r in committed:      # one label can stand for several specialisations (K, alignment)
        registers.setdefault(key(r), set()).add(r["registers"])
    changed = [key(r) for r in sample_rows if r["registers"] not in registers[key(r)]]
    assert not changed, f"benchmarks/ptxas.json was compiled from other kernels; regenerate it: {changed[:5]}"


def test_roofline_of_vit_b16_attention_matches_the_design_note():
    fwd = roofline.attention(108, 12, 197, 64, 2)
    # q, k, v 98 MB read, out 33 MB written, ~31 us of memory time at 4.3 TB/s.
    assert abs(fwd.bytes / 1e6 - (98 + 33 + 1 + 1)) < 3
    assert 29e-6 < fwd.bound_s() < 33e-6
    assert roofline.attention(108, 12, 197, 64, 2, write_dv=True).bytes - fwd.bytes == 108 * 12 * 197 * 64 * 2
