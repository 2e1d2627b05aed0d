"""The progress bar and the closing line every conversion prints."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Summary:
    what: str
    total_bytes: int
    tensors: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    quiet: bool = False

    def __post_init__(self):
        self._bar = tqdm(
            total=self.total_bytes,
            unit="B",
            unit_scale=True,
            desc=self.what,
            disable=self.quiet,
            file=sys.stderr,
            mininterval=0.5,
        )

    def add(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        self._bar.update(nbytes)

    def close(self) -> dict:
        self._bar.close()
        return {
            "tensors": self.tensors,
            "bytes": self.bytes,
            "seconds": round(time.perf_counter() - self.started, 2),
            "peak_rss_bytes": peak_rss_bytes(),
        }


def summary_line(what: str, stats: dict, out) -> str:
    return (
        f"{what}: {stats['tensors']} tensors, {stats['bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s, "
        f"peak RSS {stats['peak_rss_bytes'] / 2**30:.2f} GiB -> {out}"
    )
