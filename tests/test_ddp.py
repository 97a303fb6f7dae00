"""The same command under torchrun with a c10d rendezvous (the multi-node form): 2 CPU ranks
(gloo) match a one-process run of the same global batch, and the logged losses are the mean
over ranks (the one-process losses)."""
import json
import os
import subprocess
import sys

import torch

from tiny_run import tiny_config
from utils import assert_same_tower


def _run(args, env):
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_two_ranks_match_one_process_and_log_the_global_mean(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    path = tmp_path / "run.yaml"
    path.write_text(tiny_config(tmp_path / "data", tmp_path / "unused", "train.attention_images=0",
                                "train.select_best=false").to_yaml())
    train = ["-m", "alignclip", "train", "--config", str(path), "--output-dir"]
    _run([sys.executable, *train, str(tmp_path / "single")], env)
    # the multi-node form of the README (c10d rendezvous), here with one node of two ranks
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
          "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:29531", "--rdzv_id=alignclip-test",
          *train, str(tmp_path / "ddp")], env)
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    for part, a, b in (("visual", single["visual"], ddp["visual"]),
                       ("bma", single["bma"]["module"], ddp["bma"]["module"])):
        assert_same_tower(b, a, part)
    rows = [[r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
             if "eval" not in r] for run in ("single", "ddp")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        for key in ("total", "sls", "aal", "sim_align"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
