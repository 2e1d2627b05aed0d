"""A .safetensors file written tensor by tensor, chunk by chunk.

safetensors' own `save_file` needs every tensor of a file in memory at once; the format itself
(8-byte header length, JSON header with byte offsets, raw little-endian data) only needs the names,
dtypes and shapes up front, so a merged shard can be written while it is being computed.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def dtype_size(code: str) -> int:
    return torch.empty((), dtype=CODE_DTYPES[code]).element_size()


class SafetensorsStreamWriter:
    """Write tensors in the declared order; each may arrive in several row chunks."""

    def __init__(self, path: str | Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._sizes: list[tuple[str, int]] = []
        for name, code, shape in layout:
            n = math.prod(shape) * dtype_size(code)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._sizes.append((name, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i = 0
        self._written = 0  # bytes of the current tensor so far

    def write(self, name: str, chunk: torch.Tensor) -> None:
        expected, size = self._sizes[self._i]
        if name != expected:
            raise RuntimeError(f"{self.path}: expected tensor {expected}, got {name}")
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(data.data)
        self._written += data.nbytes
        if self._written > size:
            raise RuntimeError(f"{self.path}: tensor {name} got {self._written} bytes, expected {size}")
        if self._written == size:
            self._i += 1
            self._written = 0

    def close(self) -> None:
        if self._i != len(self._sizes):
            self._f.close()
            raise RuntimeError(f"{self.path}: closed after {self._i} of {len(self._sizes)} tensors")
        self._f.close()
