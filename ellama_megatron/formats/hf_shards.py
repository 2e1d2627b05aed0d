"""A Hugging Face folder's weights written tensor by tensor: shards <= 5 GB and their index, as
hf_folder.py reads them. (The export writes config.json and generation_config.json from
ellama_megatron.llama.hf.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ellama_megatron.formats.atomic import write_json_atomic
from ellama_megatron.formats.file_ranges import FileRange
from ellama_megatron.formats.hf_folder import INDEX_FILE
from ellama_megatron.formats.safetensors import StreamingWriter

MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"


def plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int = MAX_SHARD_BYTES):
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, dtype, shape in tensors:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, dtype, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


class ShardedWriter:
    """Accepts tensors in the planned order and spreads them over the planned shard files."""

    def __init__(
        self, folder: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int = MAX_SHARD_BYTES
    ):
        self.folder = folder
        self.shards = plan_shards(tensors, max_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard = -1
        self._writer: StreamingWriter | None = None
        self.total_size = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._current().write(name, tensor)

    def copy(self, name: str, ranges: list[FileRange]) -> None:
        """The next tensor as the bytes of ``ranges`` (StreamingWriter.copy)."""
        self._current().copy(name, ranges)

    def _current(self) -> StreamingWriter:
        """The shard the next tensor goes to (the next file when the last one is complete)."""
        if self._writer is None or self._writer.complete:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = StreamingWriter(
                self.folder / self.files[self._shard], self.shards[self._shard], metadata={"format": "pt"}
            )
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        weight_map = {name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        write_json_atomic(self.folder / INDEX_FILE, index)
