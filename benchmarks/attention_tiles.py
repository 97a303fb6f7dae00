"""CUDA only: every autotune candidate of the attention kernels timed at ViT-B/16 (B=108) and
ViT-L/14 (B=32) in bf16, and a per-kernel breakdown of the fused forward + backward from
torch.profiler, written as one JSON file for report.py.

    python benchmarks/attention_tiles.py --out tiles.json
"""
import argparse
import functools
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

from alignclip_kernels import attention  # noqa: E402

SHAPES = {"ViT-B/16 B=108": (108, 12, 197, 64), "ViT-L/14 B=32": (32, 16, 257, 64)}


def _inputs(b, h, n, d, dtype=torch.bfloat16):
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=dtype)
    q, k, v = attention._packed_views(qkv)
    return qkv, q, k, v


def sweep():
    import triton

    rows = []
    for name, (b, h, n, d) in SHAPES.items():
        qkv, q, k, v = _inputs(b, h, n, d)
        scale = d ** -0.5
        candidates = attention.autotune_candidates(d, torch.bfloat16, q.device)
        out, lse, rows_attn = attention._attention_fwd(q, k, v, 1, scale, None)
        grads = attention._packed_views(torch.empty_like(qkv))
        d_out, d_dv, d_rows = torch.randn_like(out), torch.randn_like(out), torch.randn_like(rows_attn)
        for i, cfg in enumerate(candidates["fwd"]):
            ms = triton.testing.do_bench(functools.partial(attention._attention_fwd, q, k, v, 1, scale, None, cfg))
            rows.append({"shape": name, "kernel": "forward", "config": str(cfg), "default": i == 0, "ms": ms})
        for i, cfg in enumerate(candidates["bwd"]):
            ms = triton.testing.do_bench(functools.partial(
                attention._attention_bwd, d_out, d_dv, d_rows, q, k, v, out, lse, rows_attn, 1, scale, *grads, cfg))
            rows.append({"shape": name, "kernel": "backward", "config": str(cfg), "default": i == 0, "ms": ms})
    return rows


def profile():
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import alignclip_kernels as ak

    b, h, n, d = SHAPES["ViT-B/16 B=108"]
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, dv, cls = ak.fused_alignclip_attention(*ak.split_qkv(qkv))
        torch.autograd.backward([out, dv, cls], [torch.ones_like(out), torch.ones_like(dv), torch.ones_like(cls)])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us:
            kernels[event.key] = kernels.get(event.key, 0.0) + us / 5
    return [{"kernel": k, "us_per_step": v} for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_tiles.py needs CUDA", file=sys.stderr)
        return 1
    result = {"device": torch.cuda.get_device_name(), "sweep": sweep(), "profile": profile()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for row in result["sweep"]:
        print(f"{row['shape']:<16} {row['kernel']:<9} {row['ms'] * 1e3:9.1f} us  {row['config']}"
              + ("  (default)" if row["default"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
