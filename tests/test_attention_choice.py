"""The per-shape choice between the kernels and the SDPA composite: forced paths agree in values
and gradients, `auto` times once per key, keeps the choice on disk and says it, deterministic
mode takes the fixed rule without timing, torch.compile makes the choice when it builds the
graph; and both paths' semantics for non-finite and empty input. `auto` times only on CUDA:
here the tests let it time on the CPU (the interpreted kernels against the PyTorch path)."""
import json

import pytest
import torch

import alignclip_kernels as ak
from alignclip_kernels import attention_choice
from utils import TOLERANCES, gen, packed

pytestmark = pytest.mark.skipif(not ak.backend(torch.device("cpu")).startswith("triton"),
                                reason="the choice is between the kernels and the PyTorch path: needs the interpreter")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty in-process record, a cache folder of the test's own, timing allowed on the CPU."""
    monkeypatch.setattr(attention_choice, "_CHOICES", {})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton" / "cache"))
    monkeypatch.delenv("ALIGNCLIP_ATTENTION", raising=False)
    monkeypatch.setattr(attention_choice, "TIMED_DEVICES", {"cuda", "cpu"})
    timings = []
    real = attention_choice.time_paths

    def counted(*args):
        timings.append(args)
        return real(*args)

    monkeypatch.setattr(attention_choice, "time_paths", counted)
    return timings


def _run(leaves, views, **kwargs):
    q, k, v = views(leaves)
    out, dv, rows = ak.dual_attention(q, k, v, **kwargs)
    g = gen(3)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in (out, dv, rows))
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach() for t in (out, dv, rows, *grads)]


def test_forced_paths_agree_in_values_and_gradients(monkeypatch):
    monkeypatch.setattr(attention_choice, "_CHOICES", {})
    leaves, views = packed(2, 37, 3, 16, seed=1)
    results = {}
    for path in ("triton", "sdpa"):
        monkeypatch.setenv("ALIGNCLIP_ATTENTION", path)
        results[path] = _run([x.clone().requires_grad_() for x in leaves], views)
    tol = TOLERANCES[torch.float32]
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=tol["rtol"] * 10, atol=1e-6)
    assert {e["source"] for e in ak.attention_choices().values()} == {"forced by ALIGNCLIP_ATTENTION"}


def test_auto_times_once_per_key_keeps_it_on_disk_and_says_it(fresh, monkeypatch, caplog):
    leaves, views = packed(2, 37, 3, 16, seed=2)
    with caplog.at_level("INFO", logger="alignclip_kernels"):
        for _ in range(2):
            _run([x.clone().requires_grad_() for x in leaves], views)
        _run([x.clone().requires_grad_() for x in packed(3, 50, 3, 16)[0]], views)   # N=50: the same bucket
    assert len(fresh) == 1
    (key, entry), = ak.attention_choices().items()
    assert entry["source"] == "timed" and entry["path"] in ("triton", "sdpa") and "N<=64 D=16 float32" in key
    assert entry["path"] == min(("triton", "sdpa"), key=lambda p: entry[f"{p}_ms"])
    assert sum(key in r.getMessage() for r in caplog.records) == 1
    on_disk = json.loads(open(attention_choice.cache_file()).read())
    assert on_disk[key]["path"] == entry["path"]
    monkeypatch.setattr(attention_choice, "_CHOICES", {})     # a new process: read, not timed again
    _run([x.clone().requires_grad_() for x in leaves], views)
    assert len(fresh) == 1 and ak.attention_choices()[key]["source"] == "cache"


def test_deterministic_mode_takes_the_fixed_rule_without_timing(fresh, monkeypatch):
    monkeypatch.setattr(attention_choice, "time_paths", lambda *a: pytest.fail("timed in deterministic mode"))
    leaves, views = packed(1, 20, 2, 16)
    _run([x.requires_grad_() for x in leaves], views, deterministic=True)
    (key, entry), = ak.attention_choices().items()
    assert entry == {"path": "triton", "source": "rule: deterministic mode"} and key.endswith("deterministic")


def test_a_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("ALIGNCLIP_ATTENTION", "flash")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="ALIGNCLIP_ATTENTION must be one of auto, triton, sdpa"):
        ak.dual_attention(q, q, q)


def test_the_choice_is_marked_constant_as_torch_compilers_decorator_marks_it():
    """attention_choice sets assume_constant_result's flag itself (no torch._dynamo import)."""
    from alignclip_kernels import attention_choice

    def fn():
        return 0
    marked = torch.compiler.assume_constant_result(fn)
    flags = {k: v for k, v in vars(marked).items()}
    assert flags == {k: v for k, v in vars(attention_choice._decide_when_tracing).items()} == \
        {"_dynamo_marked_constant": True}


def test_torch_compile_makes_the_choice_when_it_builds_the_graph(fresh):
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen(i)) for i in range(3))
    compiled = torch.compile(lambda q, k, v: ak.dual_attention(q, k, v), fullgraph=True, backend="eager")
    got = compiled(q, k, v)
    compiled(q, k, v)
    assert len(fresh) == 1 and len(ak.attention_choices()) == 1
    for a, b in zip(got, ak.dual_attention(q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["triton", "sdpa"])
def test_a_non_finite_query_row_gives_a_nan_row_on_both_paths(monkeypatch, path):
    monkeypatch.setenv("ALIGNCLIP_ATTENTION", path)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=gen(i)) for i in range(3))
    q[0, 1, 5, 3] = float("nan")
    q[1, 0, 0, 7] = float("inf")
    out, _, rows = ak.dual_attention(q, k, v, rows=1)
    nan_out = torch.isnan(out.view(2, 20, 2, 16)).any(-1)          # [B, N, H]
    assert nan_out.nonzero().tolist() == [[0, 5, 1], [1, 0, 0]]
    assert torch.isnan(rows).any(-1).squeeze(-1).nonzero().tolist() == [[1, 0]]   # the CLS row of (1, head 0)


@pytest.mark.parametrize("shape", [(0, 2, 9, 16), (2, 0, 9, 16), (2, 2, 9, 0)], ids=["B=0", "H=0", "D=0"])
@pytest.mark.parametrize("path", ["triton", "sdpa"])
def test_empty_input_gives_empty_outputs_and_gradients(monkeypatch, shape, path):
    monkeypatch.setenv("ALIGNCLIP_ATTENTION", path)
    b, h, n, d = shape
    qkv = torch.randn(b, n, 3, h, d, requires_grad=True)
    q, k, v = ak.split_qkv(qkv)
    out, dv, cls = ak.fused_alignclip_attention(q, k, v)
    assert out.shape == dv.shape == (b, n, h * d) and cls.shape == (b, h, n) and cls.dtype == torch.float32
    (out.sum() + dv.sum() + cls.sum()).backward()
    assert qkv.grad.shape == qkv.shape
    x = torch.randn(2, 2, 0, 16)
    out, dv, rows = ak.dual_attention(x, x, x, rows=0)
    assert out.shape == (2, 0, 32) and rows is None
    with pytest.raises(ValueError, match=r"rows must be in \[0, N=0\], got 1 \(no token, no probe row\)"):
        ak.dual_attention(x, x, x)
