"""Merge Hugging Face folders shard by shard, at several alphas in one pass over the inputs.

Memory: one base shard and the adapted tensors it needs are open (memory-mapped) at a time, and
tensors are processed in row chunks, so the peak is a small multiple of one shard, not of the model.
Output: the base folder's layout (same shard files and index, config, generation config,
tokenizer and any other top-level files).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ellama_megatron.formats.safetensors import DTYPES, StreamingWriter
from ellama_megatron.merge.hf_folder import HFFolder, MergeInputError, TensorInfo, check_mergeable
from ellama_megatron.merge.methods import METHODS, TensorStatistics, is_identity, merge_chunk
from ellama_megatron.formats.atomic import staged_outputs

# Rows of a tensor merged at once: bounds the working memory for big tensors (the 8B model's
# embedding is 1 GB in bf16) to about this many bytes per input in float32.
DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclasses.dataclass
class MergeResult:
    outputs: list[Path]
    tensors: int
    bytes_per_output: int
    notes: list[str] = dataclasses.field(default_factory=list)  # what the checks could not check


def _row_chunks(info: TensorInfo, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of dim 0 whose float32 working copy is about ``chunk_bytes``."""
    if len(info.shape) == 0 or info.shape[0] == 0:
        return [(0, 0)]
    rows = info.shape[0]
    per = max(1, chunk_bytes // (4 * math.prod(info.shape[1:])))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def _read(handle, info: TensorInfo, rows: tuple[int, int]) -> torch.Tensor:
    if len(info.shape) == 0 or info.shape[0] == 0:
        return handle.get_tensor(info.name)
    return handle.get_slice(info.name)[rows[0] : rows[1]]


def output_dirs(out: Path, alphas: list[float]) -> list[Path]:
    """One alpha: the model goes to ``out``; several: ``out/alpha_<a>`` each."""
    if len(alphas) == 1:
        return [out]
    return [out / f"alpha_{a:g}" for a in alphas]


def check_merge_request(method: str, adapted: list, alphas: list[float], weights: list[float] | None) -> None:
    """The options, checked before the inputs are opened."""
    if method not in METHODS:
        raise MergeInputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not alphas:
        raise MergeInputError("no --alpha given")
    if method in ("linear", "slerp") and len(adapted) != 1:
        raise MergeInputError(f"--method {method} merges one adapted model, got {len(adapted)}; use task_arithmetic for several")
    if weights is not None and len(weights) != len(adapted):
        raise MergeInputError(f"--weight given {len(weights)} times for {len(adapted)} adapted models; give one per model")
    if method == "slerp" and any(not 0.0 <= a <= 1.0 for a in alphas):
        raise MergeInputError(f"--alpha {alphas}: SLERP interpolates, alpha must be in [0, 1]")
    if len(set(alphas)) != len(alphas):
        raise MergeInputError(f"--alpha {alphas}: repeated value")


def adapted_roles(count: int) -> list[str]:
    """How messages name the adapted inputs: "adapted", or "adapted #i" when there are several."""
    return [f"adapted #{i + 1}" if count > 1 else "adapted" for i in range(count)]


def check_outputs(dests: list[Path], overwrite: bool, inputs: list[Path], what: str) -> None:
    """Before any work: an existing output needs --overwrite, and no output may be an input ``what``."""
    for d in dests:
        if d.exists() and not overwrite:
            raise MergeInputError(f"output {d} exists; choose another --out or pass --overwrite")
        for src in inputs:
            if d.resolve() == src.resolve():
                raise MergeInputError(f"output {d} is an input {what}; choose another --out")


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
) -> MergeResult:
    """Write one merged folder per alpha (see `output_dirs`). All checks run before any writing."""
    check_merge_request(method, adapted, alphas, weights)
    b = HFFolder.open(base, "base")
    roles = adapted_roles(len(adapted))
    others = [HFFolder.open(p, r) for p, r in zip(adapted, roles)]
    for o, r in zip(others, roles):
        check_mergeable(b, o, r)
    dests = output_dirs(Path(out), alphas)
    check_outputs(dests, overwrite, [b.path, *(o.path for o in others)], "folder")

    total_bytes = sum(math.prod(t.shape) * DTYPES[t.dtype].itemsize for t in b.tensors.values())
    with staged_outputs(dests) as tmps:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merge ({method})", disable=not progress)
        for shard in b.shards:
            infos = b.shard_tensors(shard)
            with ExitStack() as stack:
                # Opened per base shard and closed after it, so mapped pages do not pile up.
                handles: dict[tuple[int, str], object] = {}

                def handle(model: int, file: str):
                    key = (model, file)
                    if key not in handles:
                        folder = b if model == 0 else others[model - 1]
                        handles[key] = stack.enter_context(safe_open(folder.path / file, framework="pt"))
                    return handles[key]

                layout = [(t.name, DTYPES[t.dtype], t.shape) for t in infos]
                writers = [StreamingWriter(t / shard, layout, metadata=b.shard_metadata(shard)) for t in tmps]
                for info in infos:
                    sources = [(0, info)] + [(i + 1, o.tensors[info.name]) for i, o in enumerate(others)]
                    chunks_rows = _row_chunks(info, chunk_bytes)
                    stats = None
                    if method == "slerp":
                        stats = TensorStatistics()
                        for rows in chunks_rows:
                            stats.add(*(_read(handle(m, s.file), s, rows) for m, s in sources))
                    for rows in chunks_rows:
                        chunks = [_read(handle(m, s.file), s, rows) for m, s in sources]
                        for alpha, w in zip(alphas, writers):
                            same = is_identity(method, alpha)
                            if same is not None and same < len(chunks):
                                w.write(info.name, chunks[same])
                            else:
                                w.write(info.name, merge_chunk(method, alpha, chunks, weights, stats))
                        bar.update(chunks[0].numel() * chunks[0].element_size())
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
