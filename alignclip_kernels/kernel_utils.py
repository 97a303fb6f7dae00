"""What more than one op uses: the launch-configuration type, how an image's work is split over
programs, a placeholder pointer for disabled outputs, the double-backward guard, and the
`@triton.jit` helpers shared by the kernels.

The op's matrix and matrix-vector products that do not run on tensor cores go through `gemv`,
`gemv_t`, `outer_fma` and `fma_dot`: the work counter (`python -m alignclip_kernels.work`)
counts multiply-adds exactly where one of these or a `tl.dot` runs. Norms and softmax
reductions (a row's Σx², Σ G·dG) are not products of the op's math and are not counted, on
either side of the counter's ratio.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import torch

from ._runtime import HAS_TRITON, batch_factor, next_pow2, num_sms

if HAS_TRITON:
    import triton
    import triton.language as tl


@dataclass(frozen=True)
class LaunchConfig:
    """The tile sizes (constexpr kernel arguments) and launch options of one kernel.

    `LaunchConfig.of(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_N=64)`; `cfg["BLOCK_M"]`;
    `kernel[grid](..., **cfg.kwargs)`.
    """
    tiles: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def of(cls, num_warps=4, num_stages=2, **tiles):
        return cls(tuple(sorted(tiles.items())), num_warps, num_stages)

    def __getitem__(self, name):
        return dict(self.tiles)[name]

    def replace(self, num_warps=None, num_stages=None, **tiles):
        return LaunchConfig.of(num_warps or self.num_warps, num_stages or self.num_stages,
                               **{**dict(self.tiles), **tiles})

    @property
    def kwargs(self):
        return {**dict(self.tiles), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_triton(self):
        return triton.Config(dict(self.tiles), num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self):
        tiles = " ".join(f"{name}={value}" for name, value in self.tiles)
        return f"{tiles} warps={self.num_warps} stages={self.num_stages}"


MAX_SPLITS = 16   # programs per image at most: the combine reads their partials as one tile


def split_blocks(items: int, blocks_per_item: int, device) -> Tuple[int, int]:
    """(programs per item, blocks per program) so that `items` × programs fill the GPU.

    An op whose work is per image (a softmax over its patches, a logsumexp over its classes) runs
    one program per image unless that leaves multiprocessors idle (B=108 on a 132-SM H200); then
    each image's `blocks_per_item` blocks are shared by several programs, which combine their
    partial results (see `last_to_arrive`). No program is left without a block.
    """
    want = math.ceil(num_sms(device) / (max(items, 1) * batch_factor()))
    splits = max(1, min(blocks_per_item, want, MAX_SPLITS))
    per_program = -(-blocks_per_item // splits)
    return -(-blocks_per_item // per_program), per_program


def fills_gpu(programs: int, device) -> bool:
    """Whether `programs` programs (at the batch being launched) give every multiprocessor one."""
    return programs * batch_factor() >= num_sms(device)


def placeholder(device):
    """A pointer argument for an output the launch does not write (its flag is off).

    A dedicated one-element buffer, never a live tensor: a wrong flag then writes into nothing
    anyone reads, instead of silently into a result.
    """
    return torch.empty(1, dtype=torch.float32, device=device)


def loss_buffer(slots, device, exact_order):
    """Where a launch adds its loss: a zeroed scalar for atomics, or one partial per slot."""
    f32 = dict(dtype=torch.float32, device=device)
    return torch.empty((slots,), **f32) if exact_order else torch.zeros((), **f32)


def loss_total(loss, exact_order):
    """The loss from `loss_buffer` after the launch: the partials summed in index order."""
    return loss.sum() if exact_order else loss


def rows_by_label(values, labels, num_classes):
    """[K, E] fp32: row k the sum of values[b] [B, E] fp32 over the images labelled k, in image
    order (no atomics). Labels outside [0, K) add to no row (their results are NaN anyway)."""
    b, e = values.shape
    out = torch.empty((num_classes, e), dtype=torch.float32, device=values.device)
    block_e = min(1024, next_pow2(e))
    _rows_by_label_kernel[(num_classes, triton.cdiv(e, block_e))](
        Values=values, Labels=labels, Out=out, B=b, K=num_classes, E=e, stride_vb=values.stride(0),
        BLOCK_E=block_e)
    return out


def refuse_double_backward(op):
    """Called first in every Triton backward: `create_graph=True` runs it with grad mode on, and
    the kernels' gradients carry no graph, so a second derivative would silently be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"alignclip_kernels.{op}: double backward (create_graph=True) is not supported by the "
            "Triton kernels; the PyTorch path supports it (float64 inputs, or a CPU run without "
            "TRITON_INTERPRET=1)")


if HAS_TRITON:

    @triton.jit
    def gemv(mat, vec):
        """mat [M, K] · vec [K] → [M] fp32 on CUDA cores: M·K multiply-adds."""
        return tl.sum(mat.to(tl.float32) * vec.to(tl.float32)[None, :], axis=1)

    @triton.jit
    def gemv_t(mat, vec):
        """vecᵀ · mat: vec [M], mat [M, K] → [K] fp32 on CUDA cores: M·K multiply-adds."""
        return tl.sum(mat.to(tl.float32) * vec.to(tl.float32)[:, None], axis=0)

    @triton.jit
    def outer_fma(acc, col, row):
        """acc + col ⊗ row: a rank-one update of acc [M, K] by col [M] and row [K]."""
        return acc + col.to(tl.float32)[:, None] * row.to(tl.float32)[None, :]

    @triton.jit
    def fma_dot(a, b):
        """a [M, K] @ b [K, N] → [M, N] fp32 on CUDA cores, for tiles with a side below the 16
        that tensor cores need (a padded `tl.dot` would multiply mostly zeros)."""
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)

    @triton.jit
    def inv_norm(sum_sq, eps):
        """1 / max(‖x‖, ε) from Σx², as F.normalize divides."""
        return 1.0 / tl.maximum(tl.sqrt(sum_sq), eps)

    @triton.jit
    def normalize_backward(grad_hat, x_hat, norm, inv_n, eps):
        """Backward of x̂ = x / max(‖x‖, ε) for a tile of rows: (ĝ − [‖x‖ ≥ ε] x̂ (x̂·ĝ)) /
        max(‖x‖, ε); below ε the division is by the constant ε and nothing is projected out."""
        radial = tl.where(norm >= eps, tl.sum(x_hat * grad_hat, axis=1), 0.0)
        return (grad_hat - x_hat * radial[:, None]) * inv_n[:, None]

    @triton.jit
    def load_tile(Ptr, offs_r, offs_c, stride_r, stride_c, mask):
        """Ptr[offs_r, offs_c] as a [rows, columns] tile, 0 where `mask` is False."""
        return tl.load(Ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask,
                       other=0.0)

    @triton.jit
    def split_block(split, i, blocks_per_program, n_blocks, limit, BLOCK: tl.constexpr):
        """(is it a block, offsets, mask) of the i-th block of program `split`'s share of an
        item's n_blocks blocks of BLOCK indices below `limit` (see `split_blocks`)."""
        block = split * blocks_per_program + i
        offs = block * BLOCK + tl.arange(0, BLOCK)
        return block < n_blocks, offs, offs < limit

    @triton.jit
    def accumulate(Ptr, value, mask, EXACT_ORDER: tl.constexpr):
        """Ptr += value: a relaxed float atomic (a sum needs no ordering against other memory
        operations: nothing reads it before the launch ends, and a combining program orders
        through its ticket, see `last_to_arrive`), or, EXACT_ORDER (the deterministic mode), a
        plain read-add-write of a per-program partial slice that only the calling program
        touches, in the program's own order. The barrier before it orders that read after the
        program's previous write of the same slice: the two may be laid out over different
        threads (the value's layout need not be the last store's), so without it a thread could
        read a row another thread of the program has not yet written."""
        if EXACT_ORDER:
            tl.debug_barrier()
            tl.store(Ptr, tl.load(Ptr, mask=mask, other=0.0) + value, mask=mask)
        else:
            tl.atomic_add(Ptr, value, mask=mask, sem="relaxed")

    @triton.jit
    def add_loss(Loss, slot, value, EXACT_ORDER: tl.constexpr):
        """The scalar loss += value, or, EXACT_ORDER, Loss[slot] = value: one partial a slot,
        summed in index order afterwards (`loss_total`)."""
        if EXACT_ORDER:
            tl.store(Loss + slot, value)
        else:
            tl.atomic_add(Loss, value, sem="relaxed")

    @triton.jit
    def _rows_by_label_kernel(Values, Labels, Out, B, K, E, stride_vb, BLOCK_E: tl.constexpr):
        """Out[k] = Σ_{b: labels[b] = k} Values[b], b ascending: the deterministic mode's
        scatter of per-image rows into class rows."""
        k = tl.program_id(0)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        acc = tl.zeros([BLOCK_E], tl.float32)
        for b in range(0, B):
            if tl.load(Labels + b) == k:
                acc += tl.load(Values + b * stride_vb + offs_e, mask=e_mask, other=0.0)
        tl.store(Out + k * E + offs_e, acc, mask=e_mask)

    @triton.jit
    def head_program(pid, blocks_per_head, H):
        """(block, bh, b, h) of program `pid` on a one-axis grid of blocks_per_head programs per
        (image, head), blocks of a head adjacent: one axis takes 2³¹ − 1 programs where a second
        axis of B·H would stop at 65,535. bh, b and h are int64, so b · stride_b cannot overflow."""
        bh = (pid // blocks_per_head).to(tl.int64)
        return pid % blocks_per_head, bh, bh // H, bh % H

    @triton.jit
    def last_to_arrive(Tickets, slot, arrivals):
        """True in the one program, of the `arrivals` programs sharing ticket `slot`, that
        finishes last; it then combines what the others stored.

        A CTA barrier first, so that every thread's stores precede the ticket; the ticket is an
        acquire-release atomic at GPU scope, so the winner sees them, and it reads them with
        `.cg` loads, which skip its SM's L1 (an earlier winner on the same SM may have cached
        neighbouring lines).
        """
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets + slot, 1, sem="acq_rel", scope="gpu")
        return ticket == arrivals - 1

    @triton.jit
    def combine_logsumexp(Partial, n_parts, stride):
        """(M, Z) of the partial online-softmax states (m_i, l_i) at Partial[i·stride + {0, 1}]:
        M = max m_i, Z = Σ l_i e^{m_i − M}. Loads skip L1 (see `last_to_arrive`)."""
        offs = tl.arange(0, 16)
        mask = offs < n_parts
        m_part = tl.load(Partial + offs * stride, mask=mask, other=float("-inf"), cache_modifier=".cg")
        l_part = tl.load(Partial + offs * stride + 1, mask=mask, other=0.0, cache_modifier=".cg")
        m = tl.max(m_part, axis=0)
        return m, tl.sum(tl.where(l_part > 0, l_part * tl.exp(m_part - m), 0.0), axis=0)
