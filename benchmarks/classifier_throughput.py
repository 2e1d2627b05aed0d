"""Scoring throughput of the e-commerce classifier, in MB of text per second on one core.

    python benchmarks/classifier_throughput.py [--docs 4000] [--repeats 5]

Builds the demo corpora (listings, reviews, general text), trains the default model (2**20 hash
buckets, words + word pairs + byte 3/4/5-grams), then times:
  - scoring alone (DomainFilter.stream over texts already in memory, the default batch size),
  - the whole filter (read JSONL, serialize, score, write the kept records),
  - scikit-learn's HashingVectorizer on the same texts, for comparison.
Thread pools are limited to one thread so the figure is per core. Prints one line per measurement:
MB per CPU-second of this process (median and best of the repeats) and MB per wall-second.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds of this process per run. On a shared machine the CPU time is
    the per-core figure (wall time also counts the time other processes held the core)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=4000, help="documents per demo corpus (default 4000)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    args = p.parse_args()

    from ellama_megatron.classify.features import FeatureConfig
    from ellama_megatron.classify.filter import DomainFilter, filter_documents
    from ellama_megatron.classify.model import train_classifier
    from ellama_megatron.data.documents import iter_documents, read_texts
    from ellama_megatron.data.serializers import load_template
    from ellama_megatron.testing.demo_corpora import write_demo_corpora

    with tempfile.TemporaryDirectory() as d:
        c = write_demo_corpora(d, docs=args.docs, seed=0)
        listings, _ = read_texts([str(c["listings"])], "listing")
        reviews, _ = read_texts([str(c["reviews"])], "review")
        general, _ = read_texts([str(c["general_en"]), str(c["general_multilingual"])])
        clf, _, report = train_classifier(listings[:1000] + reviews[:1000], general[:2000], FeatureConfig())
        texts = listings + reviews + general
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(
            f"corpus: {len(texts)} docs, {mb:.2f} MB, mean {1e6 * mb / len(texts):.0f} bytes/doc; "
            f"held-out precision {report['heldout_metrics']['precision']:.3f} "
            f"recall {report['heldout_metrics']['recall']:.3f}"
        )

        def score_only():
            f = DomainFilter(clf, 0.5)
            for _ in f.stream((None, t) for t in texts):
                pass

        # The whole filter over a JSONL file of the same texts (read + parse + score + write).
        mixed = Path(d) / "mixed.jsonl"
        with open(mixed, "w", encoding="utf-8") as fh:
            for i, t in enumerate(texts):
                fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")

        def whole_filter():
            filter_documents(
                iter_documents([str(mixed)], load_template("plain")), DomainFilter(clf, 0.5), Path(d) / "kept.jsonl"
            )

        from sklearn.feature_extraction.text import HashingVectorizer

        def sklearn_char():
            HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=1 << 20).transform(texts)

        for name, fn in (
            ("scoring (features + dot product)", score_only),
            ("whole filter (read, score, write)", whole_filter),
            ("sklearn HashingVectorizer char_wb 3-5 (features only)", sklearn_char),
        ):
            wall, cpu = timed(fn, args.repeats if fn is not sklearn_char else 1)
            print(
                f"{name}: {mb / statistics.median(cpu):.1f} MB per CPU-second (median; best "
                f"{mb / min(cpu):.1f}), wall {mb / statistics.median(wall):.1f} MB/s ({len(wall)} runs, 1 thread)"
            )


if __name__ == "__main__":
    main()
