"""Shared test helpers: the op/oracle comparison, tolerances, a launch counter, program orders,
input makers."""
import random
import threading

import pytest
import torch
import torch.nn.functional as F

# Tolerances, normwise: max|ours − ref| ≤ atol + rtol · max|ref|, ref in float64.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=2e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unit(k, e, seed):
    """k L2-normalised rows of width e (class text features)."""
    return F.normalize(torch.randn(k, e, generator=gen(seed)), dim=-1)


def cls_rows(n_layers, b, h, n, seed):
    """CLS softmax rows [L, B, H, N] of L layers."""
    return torch.softmax(3 * torch.randn(n_layers, b, h, n, generator=gen(seed)), -1)


def patch_tokens(g, *lead, p, e, strided):
    """Patch tokens [*lead, P, E]: with `strided`, a view skipping the CLS row of [*lead, P+1, E]
    (how the model hands them over), else contiguous."""
    full = torch.randn(*lead, p + 1, e, generator=g)
    return full[..., 1:, :] if strided else full[..., :p, :]


def packed(b, n, h, d, seed=0):
    """One packed QKV projection output [B, N, 3, H, D] and a function making its q/k/v views."""
    qkv = torch.randn(b, n, 3, h, d, generator=gen(seed))

    def views(leaves):
        return [leaves[0][:, :, i].permute(0, 2, 1, 3) for i in range(3)]

    return [qkv], views


def separate(b, h, n, d, seed=0):
    g = gen(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_close(name, actual, expected, rtol, atol):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: finiteness differs"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e} (rtol={rtol}, atol={atol})"


def check_op(op, ref, floats, *, others=(), kwargs=None, dtype=torch.float32, seed=0,
             make_leaves=None, tolerance=None):
    """Compare `op(*floats, *others, **kwargs)` with `ref` run in float64 on the same values.

    Checks every output that is not None, then the gradients of every tensor in `floats` under
    random upstream gradients. `make_leaves(leaves)` may map the leaf tensors to the op's
    arguments (e.g. strided q/k/v views of one packed buffer). Returns the op's outputs.
    """
    kwargs = kwargs or {}
    tol = tolerance or TOLERANCES[dtype]
    g = gen(seed)
    leaves = [x.detach().to(dtype).requires_grad_() for x in floats]
    ref_leaves = [x.detach().to(dtype).double().requires_grad_() for x in floats]
    args = make_leaves(leaves) if make_leaves else leaves
    ref_args = make_leaves(ref_leaves) if make_leaves else ref_leaves
    outs = _as_tuple(op(*args, *others, **kwargs))
    ref_outs = _as_tuple(ref(*ref_args, *others, **kwargs))
    assert len(outs) == len(ref_outs)
    pairs = [(i, o, r) for i, (o, r) in enumerate(zip(outs, ref_outs)) if r is not None]
    for i, o, r in pairs:
        assert o is not None, f"output {i} is None but the reference returns a tensor"
        assert_close(f"output {i}", o, r, **tol)
    grads_up = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.device) for _, _, r in pairs]
    diff = [(o, gu.to(o.dtype)) for (_, o, _), gu in zip(pairs, grads_up) if o.requires_grad]
    if diff:
        got = torch.autograd.grad([o for o, _ in diff], leaves, [gu for _, gu in diff],
                                  allow_unused=True)
        want = torch.autograd.grad([r for _, _, r in pairs if r.requires_grad], ref_leaves,
                                   [gu for (_, o, r), gu in zip(pairs, grads_up) if r.requires_grad],
                                   allow_unused=True)
        for i, (gi, wi) in enumerate(zip(got, want)):
            if wi is None:
                continue
            assert gi is not None, f"gradient of input {i} is missing"
            assert_close(f"grad of input {i}", gi, wi, **tol)
    return outs


class LaunchCounter:
    """Counts Triton kernel launches (by kernel name) while the interpreter runs them."""

    def __init__(self):
        self.names = []

    def __enter__(self):
        from triton.runtime import interpreter

        self._cls = interpreter.GridExecutor
        self._orig = self._cls.__call__
        names = self.names

        def counted(executor, *args, **kw):
            names.append(executor.fn.__name__)
            return self._orig(executor, *args, **kw)

        self._cls.__call__ = counted
        return self

    def __exit__(self, *exc):
        self._cls.__call__ = self._orig
        return False

    def __len__(self):
        return len(self.names)


class AtomicRecorder(LaunchCounter):
    """Every atomic the interpreted kernels issue: (kernel, float or int, memory semantics)."""

    def __enter__(self):
        from triton.runtime import interpreter

        super().__enter__()
        self.atomics = []
        builder = interpreter.InterpreterBuilder
        self._builder, self._rmw = builder, builder.create_atomic_rmw
        recorder = self

        def recorded(this, rmw_op, ptr, val, mask, sem, scope):
            recorder.atomics.append((recorder.names[-1], val.dtype.scalar.is_floating(), str(sem).split(".")[-1]))
            return recorder._rmw(this, rmw_op, ptr, val, mask, sem, scope)

        builder.create_atomic_rmw = recorded
        return self

    def __exit__(self, *exc):
        self._builder.create_atomic_rmw = self._rmw
        return super().__exit__(*exc)


class ProgramOrder:
    """Runs every interpreted launch's programs in another order than the interpreter's: a
    GPU promises none. `"shuffled"` (seeded), `"reverse"`, or `"two-phase"`: every program runs,
    in index order, up to (not through) its first atomic (a data atomic or an arrival ticket),
    and only then does any program go on, in reverse order, to its end. Each program of a
    two-phase launch is a thread; one runs at a time, the others wait at their first atomic."""

    def __init__(self, order, seed=0):
        assert order in ("shuffled", "reverse", "two-phase"), order
        self.order, self.rng = order, random.Random(seed)

    def _sequential(self, fn, args, programs, builder):
        if self.order == "shuffled":
            self.rng.shuffle(programs)
        else:
            programs.reverse()
        for index in programs:
            builder.set_grid_idx(*index)
            fn(**args)

    def _two_phase(self, fn, args, programs, builder):
        lock = threading.Condition()
        state = {"turn": None, "errors": []}
        local = threading.local()

        def wait_for_turn(index):
            with lock:
                lock.wait_for(lambda: state["turn"] == index)
            builder.set_grid_idx(*index)

        def hand_back():
            with lock:
                state["turn"] = "main"
                lock.notify_all()

        def at_atomic():
            index = getattr(local, "index", None)
            if index is not None and not local.paused:
                local.paused = True
                hand_back()
                wait_for_turn(index)

        def program(index):
            local.index, local.paused = index, False
            wait_for_turn(index)
            try:
                fn(**args)
            except BaseException as exc:   # noqa: B036 -- re-raised on the launching thread
                state["errors"].append(exc)
            finally:
                local.index = None
                hand_back()

        self._at_atomic = at_atomic
        threads = {index: threading.Thread(target=program, args=(index,), daemon=True) for index in programs}
        for thread in threads.values():
            thread.start()
        for index in programs + programs[::-1]:   # phase one in order, phase two in reverse
            if not threads[index].is_alive():
                continue
            with lock:
                state["turn"] = index
                lock.notify_all()
                lock.wait_for(lambda: state["turn"] == "main")
        for thread in threads.values():
            thread.join()
        self._at_atomic = None
        if state["errors"]:
            raise state["errors"][0]

    def __enter__(self):
        import inspect
        import itertools

        from triton.runtime import interpreter as it

        cls, builder_cls = it.GridExecutor, it.InterpreterBuilder
        self._saved = cls.__call__, builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas
        self._at_atomic = None
        order = self

        def call(executor, *args_dev, **kwargs):
            argspec = inspect.getfullargspec(executor.fn)
            kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
            args_hst, kwargs_hst = executor._init_args_hst(args_dev, kwargs)
            for hook in executor.pre_run_hooks:
                hook(*args_hst, **kwargs_hst)
            scope = it._patch_lang(executor.fn)
            try:
                args = inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst)
                args = {n: a if n in executor.constexprs else it._implicit_cvt(a) for n, a in args.items()}
                grid = executor.grid(args) if callable(executor.grid) else executor.grid
                grid = tuple(grid) + (1,) * (3 - len(grid))
                it.interpreter_builder.set_grid_dim(*grid)
                programs = list(itertools.product(*(range(g) for g in grid)))
                run = order._two_phase if order.order == "two-phase" else order._sequential
                run(executor.fn, args, programs, it.interpreter_builder)
            finally:
                scope.restore()
            executor._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

        def pausing(original):
            def atomic(this, *a):
                if order._at_atomic is not None:
                    order._at_atomic()
                return original(this, *a)
            return atomic

        cls.__call__ = call
        builder_cls.create_atomic_rmw = pausing(self._saved[1])
        builder_cls.create_atomic_cas = pausing(self._saved[2])
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter as it

        it.GridExecutor.__call__, it.InterpreterBuilder.create_atomic_rmw, it.InterpreterBuilder.create_atomic_cas = \
            self._saved
        return False


def refusal_test(cases):
    """A test over {name: (call, exception type, message pattern)}: each bad call is refused with
    that exception, naming what was wrong."""

    @pytest.mark.parametrize("case", list(cases))
    def test(case):
        call, exc, match = cases[case]
        with pytest.raises(exc, match=match):
            call()

    return test


def assert_same_tower(got_state, want_state, what, rtol=1e-4, atol=1e-5):
    """Two trainings of one tower that differ only in fp32 summation order (ranks, micro-batches)
    agree. The key bias's true gradient is exactly zero (softmax is shift-invariant per row), so
    its gradient is rounding noise that Adam scales to ±lr steps: its query and value thirds
    are compared, not the key third."""
    for key, want in want_state.items():
        got = got_state[key]
        if key.endswith("attn.in_proj_bias"):
            third = got.shape[0] // 3
            got, want = (torch.cat([t[:third], t[2 * third:]]) for t in (got, want))
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, name=f"{what}.{key}": f"{name}: {m}")
