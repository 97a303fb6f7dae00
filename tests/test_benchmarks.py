"""The benchmark suite runs without CUDA (PyTorch providers at reduced shapes, Triton providers
skipped with the reason) and its report renders tables, the work section and plots."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_runs_and_report_renders(tmp_path):
    results = tmp_path / "bench.json"
    # Not as an xdist worker: pytest-benchmark disables itself when it sees PYTEST_XDIST_WORKER.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["TRITON_INTERPRET"] = "0"
    res = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "-q", "-n", "0",
                          "-p", "no:cacheprovider", f"--benchmark-json={results}", "--benchmark-disable-gc", "-rs"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    data = json.loads(results.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    assert any(g.startswith("attention-fwdbwd") for g in groups)
    assert any(g.startswith("train-step") for g in groups) and "bma" in groups
    assert all({"provider", "backend", "device"} <= b["extra_info"].keys() for b in data["benchmarks"])
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert {"reference", "sdpa", "sdpa-flash", "sdpa-packed", "clip-finetune", "alignclip-reference"} <= providers
    assert any(b["extra_info"].get("sdpa_backend") for b in data["benchmarks"])
    if "CUDA" not in res.stdout:
        assert "interpreted kernels are not timed" in res.stdout
    listed = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q", "-n", "0",
                             "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300).stdout
    for provider in ("fused-", "fused-leaf", "sdpa-cudnn", "sdpa-efficient", "sdpa-packed",
                     "clip-finetune-packed", "alignclip-fused"):
        assert f"[{provider}" in listed, provider
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, "benchmarks/report.py", str(results), "--work", "benchmarks/work.json",
                    "--out", str(out), "--plots", str(tmp_path / "plots")], cwd=ROOT, check=True, timeout=120)
    text = out.read_text()
    assert "## Targets" in text and "| provider | backend |" in text
    assert "## Work counted on the CPU (not timed)" in text and "work-model time" in text
    assert len(list((tmp_path / "plots").glob("*.png"))) == len(groups)
