"""What the sequential interpreter would otherwise hide until a GPU runs, checked on the CPU:
the deterministic mode (no float atomic in any launch; values and gradients equal the
reference), relaxed data atomics beside the acquire-release tickets, launch grids inside CUDA's
limits at any batch, offsets past 2³¹ elements, and launches under the tensors' device."""
import pytest
import torch

import alignclip_kernels as ak
from alignclip_kernels import _runtime, ptxas_report
from alignclip_kernels import reference as ref
from utils import AtomicRecorder, LaunchCounter, ProgramOrder, check_op, cls_rows, gen, packed, unit


def _labels(b, k, seed):
    return torch.randint(0, k, (b,), generator=gen(seed))


# Each case: (op taking `deterministic=`, its reference, float inputs, others). Shapes small
# enough for the interpreter, large enough that every op splits an image over programs (the
# interpreter pretends to 4 SMs) and takes its text gradient.
CASES = {
    "dual_attention": (lambda q, k, v, **kw: ak.dual_attention(q, k, v, rows=2, **kw),
                       lambda q, k, v: ref.dual_attention(q, k, v, rows=2), *packed(2, 37, 2, 32)),
    "sls_mms_loss": (lambda f, t, c, **kw: ak.sls_mms_loss(f, t, _labels(3, 7, 1), c, **kw),
                     lambda f, t, c: ref.sls_mms_loss(f, t, _labels(3, 7, 1), c),
                     [torch.randn(3, 40, generator=gen(2)), unit(7, 40, 3),
                      ak.class_distribution(unit(7, 40, 3))], None),
    "token_text_target": (lambda u, t, **kw: ak.token_text_target(u, t, _labels(3, 5, 4), **kw),
                          lambda u, t: ref.token_text_target(u, t, _labels(3, 5, 4)),
                          [torch.randn(3, 9, 40, generator=gen(5)), torch.randn(5, 40, generator=gen(6))], None),
    "aal_loss": (lambda a, u, t, **kw: ak.aal_loss(a, u, t, _labels(3, 5, 7), **kw),
                 lambda a, u, t: ref.aal_loss(a, u, t, _labels(3, 5, 7)),
                 [cls_rows(2, 3, 2, 10, 8), torch.randn(3, 9, 40, generator=gen(9)),
                  torch.randn(5, 40, generator=gen(10))], None),
    "aal_kl_loss": (ak.aal_kl_loss, ref.aal_kl_loss,
                    [cls_rows(2, 3, 2, 10, 11), torch.softmax(torch.randn(3, 9, generator=gen(12)), -1)], None),
    "similarity_align_loss": (ak.similarity_align_loss, ref.similarity_align_loss,
                              [torch.randn(2, 9, 40, generator=gen(13)), torch.randn(2, 9, 40, generator=gen(14)),
                               torch.randn(5, 40, generator=gen(15))], None),
}


def _run_forward_backward(name, **kwargs):
    op, _, floats, views = CASES[name]
    leaves = [x.clone().requires_grad_() for x in floats]
    outs = op(*(views(leaves) if views else leaves), **kwargs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_mode_matches_the_reference(name):
    op, reference, floats, views = CASES[name]
    check_op(lambda *a: op(*a, deterministic=True), reference, floats, make_leaves=views)


@pytest.mark.parametrize("name", list(CASES))
def test_deterministic_algorithms_leave_no_float_atomic_in_any_launch(name):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with AtomicRecorder() as recorder:
            _run_forward_backward(name)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(recorder) > 0
    floats = [a for a in recorder.atomics if a[1]]
    assert not floats, f"float atomics in deterministic mode: {floats}"


@pytest.mark.parametrize("name", list(CASES))
def test_by_default_data_atomics_are_relaxed_and_tickets_acquire_release(name):
    with AtomicRecorder() as recorder:
        _run_forward_backward(name, deterministic=False)
    data = {a for a in recorder.atomics if a[1]}
    tickets = {a for a in recorder.atomics if not a[1]}
    if name != "aal_kl_loss":   # its backward adds nothing: no data atomics at all
        assert data, "the default mode adds its partial sums atomically"
    assert all(sem == "RELAXED" for _, _, sem in data), data
    assert all(sem == "ACQUIRE_RELEASE" for _, _, sem in tickets), tickets


def _outputs_and_gradients(name, **kwargs):
    """Every output and every input gradient of one forward + backward, under fixed upstream
    gradients."""
    op, _, floats, views = CASES[name]
    leaves = [x.clone().requires_grad_() for x in floats]
    outs = op(*(views(leaves) if views else leaves), **kwargs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    g = gen(99)
    grads = torch.autograd.grad(outs, leaves, [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs])
    return [t.detach() for t in (*outs, *grads)]


ORDERS = ("shuffled", "reverse", "two-phase")


def test_program_orders_are_the_ones_asked_for():
    """Each program notes how many programs have finished, takes a ticket (its first atomic),
    then finishes (its second)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(Seen, Tickets, Counters):
        pid = tl.program_id(0)
        tl.store(Seen + pid, tl.load(Counters + 1))
        tl.store(Tickets + pid, tl.atomic_add(Counters, 1))
        tl.atomic_add(Counters + 1, 1)

    def run():
        seen, tickets = torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
        probe[(6,)](seen, tickets, torch.zeros(2, dtype=torch.int32))
        return seen.tolist(), tickets.tolist()

    ascending, descending = list(range(6)), list(range(5, -1, -1))
    assert run() == (ascending, ascending)
    with ProgramOrder("reverse"):
        assert run() == (descending, descending)
    with ProgramOrder("two-phase"):          # every program stops before its ticket: none has finished
        assert run() == ([0] * 6, descending)
    with ProgramOrder("shuffled", seed=1):
        seen, tickets = run()
    assert seen == tickets and sorted(tickets) == ascending and tickets != ascending


@pytest.mark.parametrize("name", list(CASES))
def test_programs_in_any_order_give_the_reference_and_deterministic_bits_do_not_move(name):
    """A GPU runs a launch's programs in no promised order: shuffled, reversed, and with every
    program stopped at its first atomic or ticket until all have reached theirs, each op's values
    and gradients (the default mode) equal the float64 reference within the stated tolerance,
    and the deterministic mode's are bitwise those of the interpreter's own order."""
    op, reference, floats, views = CASES[name]
    natural = _outputs_and_gradients(name, deterministic=True)
    for i, order in enumerate(ORDERS):
        with ProgramOrder(order, seed=i):
            check_op(lambda *a: op(*a, deterministic=False), reference, floats, make_leaves=views)
            moved = _outputs_and_gradients(name, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(natural, moved)), (name, order)


def test_pixel_transform_in_any_program_order():
    from alignclip_kernels.pixels import JITTER_COLUMNS

    g = gen(20)
    images = torch.randint(0, 256, (3, 40, 41, 3), dtype=torch.uint8, generator=g)
    jitter = torch.zeros(3, JITTER_COLUMNS)
    jitter[:, :3], jitter[:, 3] = 1.2, 0.1
    jitter[:, 4:8] = torch.tensor([[3.0, 1, 0, 2], [1, 0, 2, 3], [0, 2, 3, 1]])
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    want = ak.pixel_transform(images, mean, std, flip=torch.tensor([0.0, 1, 0]), jitter=jitter)
    for order in ORDERS:
        with ProgramOrder(order):
            got = ak.pixel_transform(images, mean, std, flip=torch.tensor([0.0, 1, 0]), jitter=jitter)
        assert torch.equal(got, want), order


def test_deterministic_flag_follows_torch_and_is_checked():
    assert _runtime.deterministic_flag(None) is torch.are_deterministic_algorithms_enabled()
    assert _runtime.deterministic_flag(True) is True
    with pytest.raises(TypeError, match="deterministic must be None or a bool"):
        ak.dual_attention(*[torch.randn(1, 1, 4, 32)] * 3, deterministic="yes")


def test_attention_grid_fits_cuda_limits_past_65535_heads():
    """B·H = 70,000 heads: every launch's grid inside CUDA's limits (2³¹ − 1 programs on the
    first axis, 65,535 on the others), recorded on meta tensors with sm_90 configurations."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    grids = []

    def record(self, *args, grid, warmup, **kwargs):
        grids.append((self.fn.__name__, grid))

    with pytest.MonkeyPatch.context() as patch:
        for kind in (JITFunction, InterpretedFunction):   # compiled or interpreted, never run
            patch.setattr(kind, "run", record)
        with _runtime.target_arch(9):
            for exact_order in (False, True):
                ptxas_report._attention_run(5000, 14, 20, 64, torch.bfloat16, exact_order=exact_order)
    assert {name for name, _ in grids} >= {"_attn_fwd_kernel", "_attn_bwd_main_kernel", "_attn_bwd_dq_kernel"}
    for name, grid in grids:
        assert grid[0] <= 2**31 - 1 and all(axis <= 65535 for axis in grid[1:]), (name, grid)
        assert grid[0] >= 70000, (name, grid)


def _far_apart(shape, gap, dtype, seed):
    """A tensor of `shape` whose first index steps `gap` elements (past 2³¹ for index 1), over a
    storage only the touched pages of which are ever materialised."""
    inner = torch.randn(shape, generator=gen(seed)).to(dtype)
    base = torch.empty(gap * (shape[0] - 1) + inner[0].numel(), dtype=dtype)
    view = base.as_strided(shape, (gap, *inner[0].stride()))
    view.copy_(inner)
    return view


def test_offsets_past_2_31_elements_are_exact():
    """q/k/v and tokens whose second image starts 2³¹ + 64 elements after the first: int32
    offsets would wrap and read elsewhere. fp16 keeps each storage at 4 GiB of address space."""
    gap = 2**31 + 64
    dtype = torch.float16
    q, k, v = (_far_apart((2, 2, 20, 32), gap, dtype, seed) for seed in range(3))
    out, dv, rows = ak.dual_attention(q, k, v, rows=1)
    want = ref.dual_attention(*(x.contiguous().double() for x in (q, k, v)), rows=1)
    for got, expected in zip((out, dv, rows), want):
        torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-3)
    tokens = _far_apart((2, 9, 40), gap, dtype, 3)
    text = unit(5, 40, 4).to(dtype)
    labels = torch.tensor([1, 3])
    torch.testing.assert_close(ak.token_text_target(tokens, text, labels).double(),
                               ref.token_text_target(tokens.contiguous().double(), text.double(), labels),
                               rtol=2e-2, atol=1e-3)


def test_launches_run_under_the_tensors_device():
    class OnCuda1:
        device = torch.device("cuda", 1)

    guard = _runtime.on_device(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_runtime.on_device(torch.empty(1)), torch.cuda.device)


@pytest.mark.parametrize("d,dtype", [(8, torch.float32), (24, torch.float32), (88, torch.float32),
                                     (104, torch.float32), (136, torch.float16), (256, torch.float16)])
def test_every_multiple_of_8_head_dim_runs_on_the_kernels(d, dtype):
    floats, views = packed(1, 21, 2, d, seed=d)
    with LaunchCounter() as launches:
        check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views, kwargs=dict(rows=1), dtype=dtype)
    assert "_attn_fwd_kernel" in launches.names and "_attn_bwd_main_kernel" in launches.names


def test_fp32_past_128_columns_takes_the_pytorch_path():
    """Three-pass TF32 operands beside 256-column accumulators spill (ptxas report)."""
    floats, views = packed(1, 21, 2, 136, seed=1)
    with LaunchCounter() as launches:
        check_op(ak.dual_attention, ref.dual_attention, floats, make_leaves=views, kwargs=dict(rows=1))
    assert len(launches) == 0


def test_other_head_dims_are_refused_on_the_kernels_and_run_on_the_pytorch_path(monkeypatch):
    q = torch.randn(1, 2, 9, 20)
    with pytest.raises(ValueError, match="head dim D must be a multiple of 8 from 8 to 256.*got 20"):
        ak.dual_attention(q, q, q)
    with pytest.raises(ValueError, match="got 264"):
        ak.dual_attention(*[torch.randn(1, 1, 4, 264)] * 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ak.backend("cpu") == "torch"
    out, _, rows = ak.dual_attention(q, q, q)
    want = ref.dual_attention(q.double(), q.double(), q.double())
    torch.testing.assert_close(out.double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.double(), want[2], rtol=1e-5, atol=1e-7)
