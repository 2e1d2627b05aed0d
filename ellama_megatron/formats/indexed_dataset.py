"""Megatron's indexed dataset: two files sharing a prefix, ``PREFIX.bin`` (the token ids of every
document back to back, in the dataset's dtype) and ``PREFIX.idx`` (that dtype, every sequence's
length and offset, the document boundaries). Megatron-Core writes and reads the pair
(``megatron.core.datasets.indexed_dataset``); this module is the one place the project names its
files, checks that they are there, builds one (from documents, from token payloads written by
preprocessing workers, from other pairs), renames one into place, and reads one back.

Naming and checking a pair costs a stat and imports nothing. Reading, and building from documents
or other pairs, go through Megatron-Core. Preprocessing's writer (``write_payloads``) writes the
.idx itself, byte for byte what Megatron's ``IndexedDatasetBuilder`` writes (tests/test_formats.py
compares them): importing ``megatron.core.datasets.indexed_dataset`` imports torch, 5-7 CPU-seconds
measured on the 2-core VM, a third of the time it takes to tokenize 40 MB on one core.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

# Megatron's get_bin_path / get_idx_path append exactly these (tests/test_formats.py checks): spelt
# here so that naming a pair does not import Megatron-Core.
BIN_SUFFIX, IDX_SUFFIX = ".bin", ".idx"
SUFFIXES = (BIN_SUFFIX, IDX_SUFFIX)
COPY_BLOCK = 16 << 20  # bytes per read when payloads are copied into a .bin
# The .idx layout of Megatron-Core's _IndexWriter: header, version, dtype code, counts, then the
# arrays. The dtype codes are Megatron's DType enum.
IDX_HEADER = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
UINT16_CARDINALITY = 65500  # Megatron's DType.optimal_dtype: uint16 below this many ids, int32 from it


def optimal_dtype(vocab_size: int | None) -> type:
    """The token dtype of a tokenizer's datasets, as Megatron-Core's ``DType.optimal_dtype`` chooses
    it (and so Megatron-LM's tools/preprocess_data.py): uint16 for fewer than 65,500 ids, else int32."""
    import numpy

    return numpy.uint16 if vocab_size is not None and vocab_size < UINT16_CARDINALITY else numpy.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{BIN_SUFFIX}")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{IDX_SUFFIX}")


def pair_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(``PREFIX.bin``, ``PREFIX.idx``)."""
    return bin_path(prefix), idx_path(prefix)


def missing_files(prefix: str | Path) -> list[Path]:
    """The files of the pair that are not there (``[]``: both are)."""
    return [p for p in pair_paths(prefix) if not p.is_file()]


def exists(prefix: str | Path) -> bool:
    return not missing_files(prefix)


def is_pair_file(path: str | Path) -> bool:
    """Whether ``path`` names one file of a pair (``x.bin`` or ``x.idx``)."""
    return Path(path).suffix in SUFFIXES


def prefix_of(path: str | Path) -> Path:
    """The prefix of a pair given as its prefix or as either file: ``x.bin`` and ``x.idx`` -> ``x``."""
    path = Path(path)
    return path.with_suffix("") if is_pair_file(path) else path


def replace(src_prefix: str | Path, dst_prefix: str | Path) -> None:
    """Rename a complete pair onto ``dst_prefix`` (same file system), replacing the one there; the
    .idx last, as it is what readers open first."""
    for src, dst in zip(pair_paths(src_prefix), pair_paths(dst_prefix)):
        os.replace(src, dst)


def remove(prefix: str | Path) -> None:
    """Delete the pair's files (either may be missing)."""
    for p in pair_paths(prefix):
        p.unlink(missing_ok=True)


def _staging_prefix(prefix: str | Path) -> Path:
    """Where a pair is written before the rename: same folder (an atomic rename), hidden."""
    prefix = Path(prefix)
    return prefix.with_name(f".tmp-{os.getpid()}.{prefix.name}")


class _Staged:
    """A pair written under a hidden prefix beside ``prefix`` and renamed onto it when the block
    succeeds, deleted when it raises (Ctrl-C included): readers never see half a pair."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.tmp = _staging_prefix(self.prefix)

    def __enter__(self) -> Path:
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            replace(self.tmp, self.prefix)
        else:
            remove(self.tmp)


def builder(prefix: str | Path, dtype):
    """Megatron's ``IndexedDatasetBuilder`` writing ``PREFIX.bin``; ``finalize`` writes the .idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(str(bin_path(prefix)), dtype=dtype)


def finalize(built, prefix: str | Path) -> Path:
    """Close ``built``'s .bin and write ``PREFIX.idx``; returns the prefix."""
    built.finalize(str(idx_path(prefix)))
    return Path(prefix)


def write_documents(prefix: str | Path, documents: Iterable[Sequence[int]], dtype) -> Path:
    """A pair holding ``documents`` (sequences of token ids), one sequence per document, as
    Megatron-LM's tools/preprocess_data.py writes them (``add_document(ids, [len(ids)])``); written
    whole or not at all. Returns the prefix."""
    import numpy

    with _Staged(prefix) as tmp:
        built = builder(tmp, dtype)
        for ids in documents:
            ids = numpy.asarray(ids)
            built.add_document(ids, [ids.size])
        finalize(built, tmp)
    return Path(prefix)


def write_index(path: str | Path, dtype, lengths) -> None:
    """The .idx of a pair holding one sequence per document of ``lengths`` tokens, ids in ``dtype``:
    the bytes Megatron's ``IndexedDatasetBuilder.finalize`` writes after ``add_document(ids, [len(ids)])``
    for each document (not multimodal)."""
    import numpy

    lengths = numpy.asarray(lengths, dtype=numpy.int64)
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)  # byte offset of each sequence in the .bin
    numpy.cumsum(lengths[:-1] * numpy.dtype(dtype).itemsize, out=pointers[1:])
    documents = numpy.arange(len(lengths) + 1, dtype=numpy.int64)  # sequence i ends document i
    with open(path, "wb") as f:
        f.write(IDX_HEADER)
        f.write(struct.pack("<Q", IDX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[numpy.dtype(dtype).name]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.astype(numpy.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


def write_payloads(prefix: str | Path, payloads: Iterable[tuple[str | Path, Sequence[int]]], dtype) -> Path:
    """A pair from raw payloads, in order: each a file of token ids already in ``dtype`` (documents
    back to back) with its documents' lengths. The same bytes as ``write_documents`` on those
    documents, the payload copied a file at a time (one payload is renamed, not copied) and the
    .idx written by ``write_index``, without importing Megatron-Core. Returns the prefix."""
    import numpy

    payloads = list(payloads)
    with _Staged(prefix) as tmp:
        if len(payloads) == 1:
            os.replace(payloads[0][0], bin_path(tmp))
        else:
            with open(bin_path(tmp), "wb") as out:
                for path, _ in payloads:
                    with open(path, "rb") as f:
                        shutil.copyfileobj(f, out, COPY_BLOCK)
        lengths = [numpy.asarray(n, dtype=numpy.int64) for _, n in payloads]
        write_index(idx_path(tmp), dtype, numpy.concatenate(lengths) if lengths else numpy.zeros(0, numpy.int64))
    return Path(prefix)


def concatenate(prefixes: Sequence[str | Path], out_prefix: str | Path) -> Path:
    """One pair holding the documents of ``prefixes`` in order (they share one dtype); written whole
    or not at all. Returns ``out_prefix``."""
    dtype = read(prefixes[0]).index.dtype
    with _Staged(out_prefix) as tmp:
        built = builder(tmp, dtype)
        for p in prefixes:
            built.add_index(str(p))
        finalize(built, tmp)
    return Path(out_prefix)


def read(prefix: str | Path):
    """Megatron's ``IndexedDataset`` over the pair (memory-mapped): ``len`` sequences, ``[i]`` the
    ids of sequence i, ``.sequence_lengths``, ``.document_indices``, ``.index.dtype``. Megatron
    raises AssertionError, OSError or IndexError on a damaged pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def read_sequences(prefix: str | Path, limit: int | None = None) -> list:
    """The ids of the pair's first ``limit`` sequences (all by default), one numpy array each, copied
    out of the memory map (a view would outlive the dataset that unmaps it)."""
    import numpy

    ds = read(prefix)
    n = len(ds) if limit is None else min(len(ds), limit)
    return [numpy.array(ds[i]) for i in range(n)]


def read_documents(prefix: str, documents: list[int] | None = None, count: int = 16, limit: int | None = None):
    """(index, ids) of ``documents`` of the indexed dataset at ``prefix`` (.bin/.idx), or of ``count``
    of them spread over it (the first, the last, evenly spaced ones between) when None; of each at
    most its first ``limit`` ids when given.

    Read with numpy, not Megatron's IndexedDataset: importing that costs the launcher torch and
    Megatron (seconds to tens of seconds), and this reads a few documents. Raises ValueError for a
    pair it cannot read, OSError for a missing file."""
    import numpy as np

    with open(idx_path(prefix), "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != IDX_HEADER or int.from_bytes(head[9:17], "little") != IDX_VERSION:
            raise ValueError(f"{prefix}.idx is not a Megatron indexed dataset index (version 1)")
        dtype = {code: name for name, code in DTYPE_CODES.items()}.get(head[17])
        if dtype is None:
            raise ValueError(f"{prefix}.idx: unknown token dtype code {head[17]}")
        sequences = int.from_bytes(head[18:26], "little")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
        pointers = np.fromfile(f, dtype=np.int64, count=sequences)
    if len(pointers) != sequences:
        raise ValueError(f"{prefix}.idx is cut short ({len(pointers)} of {sequences} sequences)")
    if documents is None:
        documents = sorted({int(i) for i in np.linspace(0, sequences - 1, min(count, sequences))})
    out = []
    with open(bin_path(prefix), "rb") as f:
        for d in documents:
            f.seek(int(pointers[d]))
            length = int(lengths[d]) if limit is None else min(int(lengths[d]), limit)
            ids = np.fromfile(f, dtype=dtype, count=length)
            if len(ids) != length:
                raise ValueError(f"{prefix}.bin is cut short (document {d})")
            out.append((d, ids))
    return out
