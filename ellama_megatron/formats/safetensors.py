"""Read and write safetensors files one tensor at a time, with plain file I/O.

The safetensors library maps whole files into memory; the pages it touches count as resident memory
while the file stays open, so streaming a 5 GB shard through it can hold 5 GB. Reading each tensor
with ``readinto`` and writing each one with ``write`` keeps only the tensor in hand in memory.
Format: 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets
relative to the end of the header), then the bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ellama_megatron.formats.file_ranges import FileRange, copy_ranges, read_ranges

DTYPES = {  # the format's dtype codes
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _raw_header(path: Path) -> tuple[int, dict, int]:
    """(header length, the header's JSON, file size); a truncated or corrupt file raises SafetensorsError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit a {size}-byte file (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    return n, header, size


def read_metadata(path: Path) -> dict[str, str] | None:
    """The header's ``__metadata__`` (free-form strings), if any."""
    return _raw_header(path)[1].get("__metadata__")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a file's header; a truncated or corrupt file raises SafetensorsError."""
    n, header, size = _raw_header(path)
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} spans {end - begin} bytes, its shape {shape} needs {expected}"
            )
        entries[name] = TensorEntry(name, dtype, shape, 8 + n + begin, 8 + n + end)
        data_end = max(data_end, end)
    if 8 + n + data_end != size:
        raise SafetensorsError(
            f"{path}: header describes {8 + n + data_end} bytes but the file has {size} (truncated or corrupt); "
            "download the shard again"
        )
    return entries


def _span(entry: TensorEntry, rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
    """(shape, file offset, bytes) of the tensor, or of its rows ``rows``."""
    shape, start, nbytes = entry.shape, entry.start, entry.nbytes
    if rows is not None and shape:
        row_bytes = entry.nbytes // shape[0] if shape[0] else 0
        shape = (rows[1] - rows[0],) + shape[1:]
        start, nbytes = entry.start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
    return shape, start, nbytes


def will_read(path: Path, entry: TensorEntry, rows: tuple[int, int] | None = None) -> None:
    """Tell the kernel that the tensor (or its rows) will be read soon: it reads them from the disk
    in the background (posix_fadvise WILLNEED), so the read finds them in the page cache."""
    if hasattr(os, "posix_fadvise"):
        _, start, nbytes = _span(entry, rows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def read_tensor(path: Path, entry: TensorEntry, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The whole tensor, or only its rows ``rows`` = (start, stop) of dim 0 (the merges work on
    row chunks of big tensors)."""
    shape, start, nbytes = _span(entry, rows)
    out = torch.empty(shape, dtype=entry.dtype)  # not zero-filled: the read fills it
    if nbytes == 0:
        return out
    view = memoryview(out.view(-1).view(torch.uint8).numpy())  # read straight into the tensor
    if read_ranges([FileRange(path, start, nbytes)], view) < nbytes:
        raise SafetensorsError(f"{path}: short read of tensor {entry.name!r} (file changed while reading?)")
    return out


class StreamingWriter:
    """Writes one safetensors file whose tensor names, dtypes and shapes are known up front; the
    bytes then arrive in the planned order, each tensor whole or in consecutive row chunks (the
    merges write a tensor while computing it). ``metadata``: the header's ``__metadata__``, if any."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = path
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in plan:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
        # Unbuffered: tensors go straight from their memory, copied ranges at the file's position.
        self._file = open(path, "wb", buffering=0)
        self._write_all(struct.pack("<Q", len(text)) + text)
        self._next = 0
        self._written = 0  # bytes of the current tensor so far

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next planned tensor, or its next rows."""
        planned, dtype, shape, nbytes = self._order[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)[1:]) != (planned, dtype, shape[1:]):
            raise AssertionError(
                f"writing {name} {tensor.dtype} {tuple(tensor.shape)}, planned {planned} {dtype} {shape}"
            )
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._write_all(memoryview(data.numpy()))
        self._advance(name, data.numel())

    def copy(self, name: str, ranges: list[FileRange]) -> None:
        """The next planned tensor (or its next rows) as the bytes of ``ranges``, copied from file to
        file (formats/file_ranges.py): their dtype and layout are the caller's to vouch for."""
        if name != self._order[self._next][0]:
            raise AssertionError(f"copying {name}, planned {self._order[self._next][0]}")
        self._advance(name, copy_ranges(ranges, self._file.fileno()))

    def _write_all(self, data) -> None:
        data = memoryview(data)
        done = 0
        while done < len(data):  # an unbuffered write may write part (at most about 2 GiB at once)
            done += self._file.write(data[done:])

    def _advance(self, name: str, written: int) -> None:
        nbytes = self._order[self._next][3]
        self._written += written
        if self._written > nbytes:
            raise AssertionError(f"{self.path}: {name} got {self._written} bytes, planned {nbytes}")
        if self._written == nbytes:
            self._next += 1
            self._written = 0

    @property
    def complete(self) -> bool:
        return self._next == len(self._order)

    def close(self) -> None:
        self._file.close()
        if not self.complete:
            raise AssertionError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
