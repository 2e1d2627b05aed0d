"""The merge formulas, applied to one chunk of one tensor at a time.

Every method is a weighted sum of the input tensors, so a tensor can be merged in row chunks
(`row_ranges`); SLERP's weights depend on the angle between the whole tensors, which a first pass
over the chunks measures (`TensorStatistics.of`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

METHODS = ("linear", "slerp", "task_arithmetic")

# Above this |cos| between base and adapted, sin(theta) is so small that SLERP's weights lose
# precision; the arc is then indistinguishable from the chord, so linear interpolation is used
# (the same threshold and fallback as mergekit).
SLERP_PARALLEL_THRESHOLD = 0.9995
# Norms below this are treated as zero vectors (no angle defined): SLERP falls back to linear.
SLERP_NORM_EPS = 1e-8


@dataclasses.dataclass
class TensorStatistics:
    """Running sums over a tensor's chunks, for SLERP's angle (float64 for stability)."""

    dot: float = 0.0
    base_sq: float = 0.0
    adapted_sq: float = 0.0

    def add(self, base: torch.Tensor, adapted: torch.Tensor) -> None:
        """Add a chunk's sums, block by block (float64 copies of one block at a time)."""
        fb, fa = base.reshape(-1), adapted.reshape(-1)
        n = fb.numel()
        b = torch.empty(min(n, BLOCK_ELEMENTS), dtype=torch.float64)
        a = torch.empty_like(b)
        for start in range(0, n, BLOCK_ELEMENTS):
            stop = min(n, start + BLOCK_ELEMENTS)
            bb, ab = b[: stop - start].copy_(fb[start:stop]), a[: stop - start].copy_(fa[start:stop])
            self.dot += float(bb @ ab)
            self.base_sq += float(bb @ bb)
            self.adapted_sq += float(ab @ ab)

    def __iadd__(self, other: TensorStatistics) -> TensorStatistics:
        self.dot += other.dot
        self.base_sq += other.base_sq
        self.adapted_sq += other.adapted_sq
        return self

    @classmethod
    def of(cls, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> TensorStatistics:
        """The sums over a tensor's (base, adapted) row chunks."""
        stats = cls()
        for base, adapted in chunks:
            stats.add(base, adapted)
        return stats


def row_ranges(shape: tuple[int, ...], chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of dim 0 whose float32 working copy is about ``chunk_bytes``; a scalar or empty
    tensor is one range."""
    if len(shape) == 0 or shape[0] == 0:
        return [(0, shape[0] if shape else 0)]
    per = max(1, chunk_bytes // (4 * math.prod(shape[1:])))
    return [(r, min(shape[0], r + per)) for r in range(0, shape[0], per)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges run in float32 (float64 inputs stay float64); results are cast back to the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements per block of the weighted sums: their float32 temporaries (256 KiB each) stay in the
# core's L2 cache, so converting, scaling and adding cost one pass over memory, not one each.
BLOCK_ELEMENTS = 1 << 16


def weighted_sum(
    chunks: list[torch.Tensor], weights: list[float], divisor: float = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_i weights[i] * chunks[i] / divisor`` in the compute dtype, rounded once to the
    chunks' dtype, block by block. Every element sees the same operations in the same order as
    the whole-tensor expression ``(w0 * c0.float() + w1 * c1.float() + ...) / divisor`` (no
    fused multiply-add), so the result is bit for bit that expression's; ``divisor`` 1 divides
    nothing. ``out``: where to write (a tensor of the chunks' shape and dtype)."""
    first = chunks[0]
    ct = compute_dtype(first.dtype)
    out = torch.empty(first.shape, dtype=first.dtype) if out is None else out
    flat_in = [c.reshape(-1) for c in chunks]
    flat_out = out.view(-1)
    n = flat_out.numel()
    size = min(n, BLOCK_ELEMENTS)
    acc = torch.empty(size, dtype=ct)
    tmp = torch.empty(size, dtype=ct)
    # One-element weight tensors (not Python scalars): the product of a bf16 block and a float32
    # tensor is computed in float32 in one operation, the conversion included; same bits.
    ws = [torch.tensor([w], dtype=ct) for w in weights]
    for start in range(0, n, BLOCK_ELEMENTS):
        stop = min(n, start + BLOCK_ELEMENTS)
        a = torch.mul(flat_in[0][start:stop], ws[0], out=acc[: stop - start])
        for c, w in zip(flat_in[1:], ws[1:]):
            a.add_(torch.mul(c[start:stop], w, out=tmp[: stop - start]))
        if divisor != 1.0:
            a.div_(divisor)
        flat_out[start:stop].copy_(a)
    return out


class WeightedAccumulator:
    """``weighted_sum`` over inputs that arrive one at a time (each whole tensor read once, any
    number of inputs): a float32 (float64) running sum of the tensor's size, the same operations
    per element in the same order, so the same bits."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None

    def add(self, tensor: torch.Tensor, weight: float) -> None:
        flat = tensor.reshape(-1)
        if self.sum is None:
            self.dtype, self.shape = tensor.dtype, tensor.shape
            self.sum = torch.empty(flat.numel(), dtype=compute_dtype(tensor.dtype))
            w = torch.tensor([weight], dtype=self.sum.dtype)  # converts and scales in one op (weighted_sum)
            for start in range(0, flat.numel(), BLOCK_ELEMENTS):
                stop = start + BLOCK_ELEMENTS
                torch.mul(flat[start:stop], w, out=self.sum[start:stop])
            return
        w = torch.tensor([weight], dtype=self.sum.dtype)
        tmp = torch.empty(min(flat.numel(), BLOCK_ELEMENTS), dtype=self.sum.dtype)
        for start in range(0, flat.numel(), BLOCK_ELEMENTS):
            stop = min(flat.numel(), start + BLOCK_ELEMENTS)
            self.sum[start:stop].add_(torch.mul(flat[start:stop], w, out=tmp[: stop - start]))

    def result(self, divisor: float = 1.0) -> torch.Tensor:
        """The sum divided by ``divisor``, rounded once to the inputs' dtype."""
        out = torch.empty(self.shape, dtype=self.dtype)
        flat = out.view(-1)
        for start in range(0, flat.numel(), BLOCK_ELEMENTS):
            stop = start + BLOCK_ELEMENTS
            block = self.sum[start:stop]
            if divisor != 1.0:
                block.div_(divisor)
            flat[start:stop].copy_(block)
        return out


def slerp_weights(t: float, stats: TensorStatistics) -> tuple[float, float]:
    """(w_base, w_adapted) with slerp = w_base * base + w_adapted * adapted on the unnormalised tensors.

    Falls back to the linear weights (1 - t, t) when the tensors are near-parallel or one is zero.
    """
    nb, na = math.sqrt(stats.base_sq), math.sqrt(stats.adapted_sq)
    if nb < SLERP_NORM_EPS or na < SLERP_NORM_EPS:
        return 1.0 - t, t
    cos = stats.dot / (nb * na)
    if abs(cos) > SLERP_PARALLEL_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def is_identity(method: str, alpha: float) -> int | None:
    """Index of the input an alpha reproduces exactly (0 = base, 1 = adapted), else None.

    These outputs copy the input bytes instead of computing: a float formula would turn -0.0 into
    0.0 and would not be bit-identical in every dtype.
    """
    if alpha == 0.0:
        return 0
    if alpha == 1.0 and method in ("linear", "slerp"):
        return 1
    return None


def merge_chunk(
    method: str,
    alpha: float,
    chunks: list[torch.Tensor],
    weights: list[float] | None = None,
    stats: TensorStatistics | None = None,
) -> torch.Tensor:
    """Merge one chunk. ``chunks[0]`` is the base; ``chunks[1:]`` the adapted model(s).

    linear:          (1 - alpha) * base + alpha * adapted
    slerp:           spherical interpolation at t = alpha (needs ``stats`` of the whole tensor)
    task_arithmetic: base + alpha * sum_i weights[i] * (model_i - base)

    An alpha that reproduces one input gives that input's chunk itself (see `is_identity`).
    """
    same = is_identity(method, alpha)
    if same is not None and same < len(chunks):
        return chunks[same]
    out_dtype = chunks[0].dtype
    if not out_dtype.is_floating_point:
        # Integer buffers (none in Llama) are not interpolated: they come from the base.
        return chunks[0]
    if method == "linear":
        return weighted_sum(chunks[:2], [1.0 - alpha, alpha])
    if method == "slerp":
        if stats is None:
            raise ValueError("slerp needs the whole tensor's statistics")
        return weighted_sum(chunks[:2], list(slerp_weights(alpha, stats)))
    if method == "task_arithmetic":
        return task_arithmetic(chunks, alpha, weights or [1.0] * (len(chunks) - 1))
    raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def task_arithmetic(chunks: list[torch.Tensor], alpha: float, weights: list[float]) -> torch.Tensor:
    """``base + alpha * sum_i weights[i] * (chunks[1 + i] - base)`` in the compute dtype, rounded
    once, block by block (the same operations per element as the whole-tensor expression)."""
    ct = compute_dtype(chunks[0].dtype)
    out = torch.empty(chunks[0].shape, dtype=chunks[0].dtype)
    flat = [c.reshape(-1) for c in chunks]
    flat_out = out.view(-1)
    n = flat_out.numel()
    size = min(n, BLOCK_ELEMENTS)
    base, delta, tmp = (torch.empty(size, dtype=ct) for _ in range(3))
    for start in range(0, n, BLOCK_ELEMENTS):
        stop = min(n, start + BLOCK_ELEMENTS)
        k = stop - start
        b, d = base[:k].copy_(flat[0][start:stop]), delta[:k].zero_()
        for w, m in zip(weights, flat[1:]):
            d.add_(tmp[:k].copy_(m[start:stop]).sub_(b).mul_(w))
        flat_out[start:stop].copy_(d.mul_(alpha).add_(b))
    return out
