"""Merge Hugging Face folders shard by shard, at several alphas in one pass over the inputs.

Speed: the row chunks are read and merged on worker threads ahead of the writer
(formats.prefetch.ordered_map), so reading, arithmetic and writing overlap; the arithmetic runs
block by block in cache (merge.methods).
Memory: tensors are read and merged in row chunks (plain reads of those rows, no memory-mapped
shards), a few chunks in flight, so the peak is a small multiple of one chunk, not of a shard or
of the model.
Output: the base folder's layout (same shard files and index, config, generation config,
tokenizer and any other top-level files).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from ellama_megatron.formats.atomic import staged_outputs
from ellama_megatron.formats.prefetch import ordered_map, parallel_work
from ellama_megatron.formats.safetensors import StreamingWriter
from ellama_megatron.merge.hf_inputs import check_mergeable, open_input
from ellama_megatron.merge.methods import TensorStatistics, merge_chunk, row_ranges
from ellama_megatron.merge.request import (
    DEFAULT_CHUNK_BYTES,
    MergeResult,
    adapted_roles,
    check_merge_request,
    check_outputs,
    output_dirs,
)

# Row chunks (up to DEFAULT_CHUNK_BYTES / 2 of each bf16 input) whose reading from the disk is
# started ahead of the one being merged: two 8B inputs do not fit a 24 GiB page cache beside the
# output, and the merge waits on the disk otherwise (measured with cold caches: 40.7-40.9 s without,
# 36.1-36.5 s with 16, 37.2-37.4 s with 64; docs/benchmarks.md, "Merging").
READ_AHEAD_CHUNKS = 16


def merge_hf_folders(
    base: str | Path,
    adapted: list[str | Path],
    alphas: list[float],
    out: str | Path,
    method: str = "linear",
    weights: list[float] | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    extrapolate: bool = False,
) -> MergeResult:
    """Write one merged folder per alpha (see `output_dirs`). All checks run before any writing."""
    check_merge_request(method, adapted, alphas, weights, extrapolate)
    b = open_input(base, "base")
    roles = adapted_roles(len(adapted))
    others = [open_input(p, r) for p, r in zip(adapted, roles)]
    for o, r in zip(others, roles):
        check_mergeable(b, o, r)
    dests = output_dirs(Path(out), alphas)
    check_outputs(dests, overwrite, [b.path, *(o.path for o in others)], "folder")

    inputs = [b, *others]
    total_bytes = sum(entry.nbytes for _, entry in b.tensors.values())
    with staged_outputs(dests) as tmps, parallel_work():
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge ({method})", disable=not progress)
        for shard in b.shards:
            entries = b.shard_tensors(shard)
            layout = [(e.name, e.dtype, e.shape) for e in entries]
            work = [(e, rows) for e in entries for rows in row_ranges(e.shape, chunk_bytes)]

            def read(item):
                entry, rows = item
                return [m.read(entry.name, rows) for m in inputs]

            stats: dict[str, TensorStatistics] = {}
            if method == "slerp":  # the angle of each whole tensor first: one pass over the shard
                for (entry, _), part in zip(work, ordered_map(lambda item: TensorStatistics.of([read(item)]), work)):
                    stats.setdefault(entry.name, TensorStatistics())
                    stats[entry.name] += part

            def merge(numbered, stats=stats, work=work):
                i, item = numbered
                # The disk reads the chunks READ_AHEAD_CHUNKS ahead in the background while this
                # one is merged (at the start: all of them up to there).
                first = 1 if i == 0 else i + READ_AHEAD_CHUNKS
                for entry, rows in work[first : i + READ_AHEAD_CHUNKS + 1]:
                    for m in inputs:
                        m.will_read(entry.name, rows)
                chunks = read(item)
                return [merge_chunk(method, alpha, chunks, weights, stats.get(item[0].name)) for alpha in alphas]

            writers = [StreamingWriter(t / shard, layout, metadata=b.shard_metadata(shard)) for t in tmps]
            for (entry, _), merged in zip(work, ordered_map(merge, list(enumerate(work)))):
                for w, t in zip(writers, merged):
                    w.write(entry.name, t)
                bar.update(merged[0].numel() * merged[0].element_size())
            for w in writers:
                w.close()
        bar.close()
        weight_files = b.weight_files()
        for f in sorted(b.path.iterdir()):
            if f.is_file() and f.name not in weight_files:
                for t in tmps:
                    shutil.copy2(f, t / f.name)
        if b.index_file:
            for t in tmps:
                shutil.copy2(b.path / b.index_file, t / b.index_file)
    return MergeResult(dests, len(b.tensors), total_bytes)
