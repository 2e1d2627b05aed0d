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
        b = base.double().reshape(-1)
        a = adapted.double().reshape(-1)
        self.dot += float(b @ a)
        self.base_sq += float(b @ b)
        self.adapted_sq += float(a @ a)

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
    ct = compute_dtype(out_dtype)
    base = chunks[0].to(ct)
    if method == "linear":
        out = (1.0 - alpha) * base + alpha * chunks[1].to(ct)
    elif method == "slerp":
        if stats is None:
            raise ValueError("slerp needs the whole tensor's statistics")
        wb, wa = slerp_weights(alpha, stats)
        out = wb * base + wa * chunks[1].to(ct)
    elif method == "task_arithmetic":
        weights = weights or [1.0] * (len(chunks) - 1)
        delta = torch.zeros_like(base)
        for w, m in zip(weights, chunks[1:]):
            delta += w * (m.to(ct) - base)
        out = base + alpha * delta
    else:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    return out.to(out_dtype)
