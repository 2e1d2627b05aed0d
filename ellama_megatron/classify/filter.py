"""Keep the documents the classifier scores above a threshold, streaming, with a score histogram.

``DomainFilter`` is the hook for other pipelines (tools/preprocess_data.py --domain-filter runs it in
its encode workers, after serialization and before tokenization): ``keep(text)`` for one
document, ``keep_batch(texts)`` for many (much faster: features are hashed per batch), both
updating ``stats``. ``filter_files`` is what ``tools/domain_classifier.py filter`` runs.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ellama_megatron.classify.model import DomainClassifier
from ellama_megatron.formats.atomic import atomic_file

HISTOGRAM_BINS = 20  # equal-width score bins over [0, 1]
BATCH_BYTES = 128 << 10  # text per scoring batch: large enough to amortise numpy calls, small enough for cache


@dataclass
class FilterStats:
    threshold: float
    docs: int = 0
    kept: int = 0
    bytes: int = 0
    kept_bytes: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    seconds: float = 0.0  # time spent scoring (reading and writing excluded)

    def add(self, texts: Sequence[str], scores: np.ndarray, kept: np.ndarray) -> None:
        sizes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
        self.docs += len(texts)
        self.kept += int(kept.sum())
        self.bytes += int(sizes.sum())
        self.kept_bytes += int(sizes[kept].sum())
        bins = np.minimum((scores * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        for b, n in zip(*np.unique(bins, return_counts=True)):
            self.histogram[int(b)] += int(n)

    def merge(self, other: FilterStats) -> None:
        """Add another part's counts (the parallel workers of tools/preprocess_data.py)."""
        self.docs += other.docs
        self.kept += other.kept
        self.bytes += other.bytes
        self.kept_bytes += other.kept_bytes
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]
        self.seconds += other.seconds

    @classmethod
    def from_dict(cls, d: dict) -> FilterStats:
        """The counts ``to_dict`` wrote (a manifest's domain_filter), to merge them again."""
        return cls(
            d["threshold"],
            d["docs"],
            d["kept"],
            d["bytes"],
            d["kept_bytes"],
            [b["docs"] for b in d["histogram"]],
            d["scoring_seconds"],
        )

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "docs": self.docs,
            "kept": self.kept,
            "kept_fraction": self.kept / self.docs if self.docs else 0.0,
            "bytes": self.bytes,
            "kept_bytes": self.kept_bytes,
            "scoring_seconds": round(self.seconds, 3),
            "scoring_mb_per_s": round(self.bytes / 1e6 / self.seconds, 2) if self.seconds else None,
            "histogram": [
                {"from": i / HISTOGRAM_BINS, "to": (i + 1) / HISTOGRAM_BINS, "docs": n}
                for i, n in enumerate(self.histogram)
            ],
        }

    def histogram_text(self, width: int = 40) -> str:
        top = max(max(self.histogram), 1)
        lines = []
        for i, n in enumerate(self.histogram):
            lo = i / HISTOGRAM_BINS
            mark = ">" if lo >= self.threshold else " "
            lines.append(f"{mark} {lo:4.2f}-{lo + 1 / HISTOGRAM_BINS:4.2f} {n:9d} {'#' * round(width * n / top)}")
        return "\n".join(lines)


class DomainFilter:
    """Keeps documents whose e-commerce probability is strictly above ``threshold``."""

    def __init__(self, model: str | Path | DomainClassifier, threshold: float | None = None):
        self.classifier = model if isinstance(model, DomainClassifier) else DomainClassifier.load(model)
        t = threshold if threshold is not None else self.classifier.metadata.get("threshold", 0.5)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {t}")
        self.threshold = float(t)
        self.stats = FilterStats(self.threshold)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return self.classifier.score(texts)

    def _score_and_count(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and keep-decisions of ``texts``, counted in ``stats``."""
        t0 = time.perf_counter()
        scores = self.scores(texts)
        self.stats.seconds += time.perf_counter() - t0
        kept = scores > self.threshold
        self.stats.add(texts, scores, kept)
        return scores, kept

    def keep_batch(self, texts: Sequence[str]) -> np.ndarray:
        """A boolean per text; counts them in ``stats``."""
        return self._score_and_count(texts)[1]

    def keep(self, text: str) -> bool:
        return bool(self.keep_batch([text])[0])

    def stream(
        self, docs: Iterable[tuple[dict, str]], batch_bytes: int = BATCH_BYTES
    ) -> Iterator[tuple[dict, str, float, bool]]:
        """(record, text, score, kept) for every (record, text), scored in batches of about ``batch_bytes``."""
        batch: list[tuple[dict, str]] = []
        size = 0
        for rec, text in docs:
            batch.append((rec, text))
            size += len(text)
            if size >= batch_bytes:
                yield from self._flush(batch)
                batch, size = [], 0
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch):
        scores, kept = self._score_and_count([t for _, t in batch])
        for (rec, text), s, k in zip(batch, scores, kept):
            yield rec, text, float(s), bool(k)


def open_jsonl_writer(path: Path):
    """A text stream writing JSON Lines, compressed by the name's suffix (.gz, .zst)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "wb"), encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(
            zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True), encoding="utf-8"
        )
    return open(path, "w", encoding="utf-8")


def filter_documents(
    docs: Iterable[tuple[dict, str]],
    domain_filter: DomainFilter,
    out: str | Path,
    score_field: str | None = "domain_score",
    progress=None,
) -> FilterStats:
    """Write the kept records to ``out`` (JSONL; .gz/.zst by suffix), each with its score in
    ``score_field`` (None: records unchanged). The file appears only when complete."""
    # The temporary sibling keeps the name's suffix, so it is compressed as ``out`` will be.
    with atomic_file(out) as tmp, open_jsonl_writer(tmp) as f:
        for rec, text, score, kept in domain_filter.stream(docs):
            if progress is not None:
                progress(len(text.encode("utf-8")))
            if kept:
                if score_field:
                    rec = {**rec, score_field: round(score, 6)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return domain_filter.stats
