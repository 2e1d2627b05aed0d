"""A Hugging Face model folder, read without loading weights: config.json, the safetensors shards
(one file, or several listed by model.safetensors.index.json), each tensor's name, dtype, shape and
place, and the files that travel with the weights. The converter, the merges and the vocabulary
extension read folders through it; what config.json means for Llama is ellama_megatron.llama's
business, which files make a tokenizer is tokenizer_folder.py's.

Everything that can make a reader fail later (missing or damaged shards, an index naming the wrong
shard) is found when the folder is opened, reading only headers, so a bad input costs seconds.

Importing this module does not import torch (the safetensors reader is imported where a shard is
read): the launcher finds checkpoint records through this room in a process that trains nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ellama_megatron.formats.tokenizer_folder import TOKENIZER_FILES

if TYPE_CHECKING:
    import torch

    from ellama_megatron.formats.safetensors import TensorEntry

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What travels with the weights when a folder is converted: the tokenizer, the generation settings,
# and the copy of the tokenizer Meta's downloads keep beside the original weights.
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json", "original/tokenizer.model")


class HFFolderError(ValueError):
    """A folder that is not a readable Hugging Face model folder; the message names the file and the fix."""


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def carry_hf_files(src: Path, dst: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy the tokenizer and generation files (and ``extra``) that exist in ``src``."""
    carried = []
    for name in (*extra, *CARRIED_FILES):
        if (src / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            carried.append(name)
    return carried


def read_config(folder: Path) -> dict:
    """config.json as written."""
    path = folder / "config.json"
    if not path.exists():
        raise HFFolderError(f"{path}: missing; give a Hugging Face model folder (save_pretrained output)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFolderError(f"{path}: not valid JSON ({e})") from None


def has_weights(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


@dataclass
class HFFolder:
    path: Path
    shards: list[str]  # shard file names, in the index's order
    index_file: str | None  # INDEX_FILE when sharded
    tensors: dict[str, tuple[Path, TensorEntry]]  # name -> (its shard, where it is in it)

    @classmethod
    def open(cls, path: str | Path) -> HFFolder:
        """The folder's shards and tensors, every header checked; raises HFFolderError."""
        from ellama_megatron.formats.safetensors import SafetensorsError, read_header

        folder = Path(path)
        if not folder.is_dir():
            raise HFFolderError(f"{folder}: not a directory; give a Hugging Face model folder")
        read_config(folder)  # present and valid before any shard is read
        index = folder / INDEX_FILE
        if index.exists():
            try:
                weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFFolderError(f"{index}: not a safetensors index ({e})") from None
            shards, index_file = list(dict.fromkeys(weight_map.values())), INDEX_FILE
        elif (folder / SINGLE_FILE).exists():
            weight_map, shards, index_file = None, [SINGLE_FILE], None
        else:
            raise HFFolderError(
                f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}; only safetensors weights are read "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        missing = [f for f in shards if not (folder / f).exists()]
        if missing:
            raise HFFolderError(f"{index}: lists shards that are not in the folder: {missing}; download them")
        tensors: dict[str, tuple[Path, TensorEntry]] = {}
        for f in shards:
            try:
                header = read_header(folder / f)
            except SafetensorsError as e:
                raise HFFolderError(str(e)) from None
            for name, entry in header.items():
                tensors[name] = (folder / f, entry)
        for name, f in (weight_map or {}).items():
            if name not in tensors or tensors[name][0].name != f:
                raise HFFolderError(f"{index}: maps {name} to {f}, which does not contain it (corrupt shard or index)")
        return cls(folder, shards, index_file, tensors)

    def config(self) -> dict:
        return read_config(self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A whole tensor, or its rows ``rows`` = (start, stop) of dim 0."""
        from ellama_megatron.formats.safetensors import read_tensor

        path, entry = self.tensors[name]
        return read_tensor(path, entry, rows)

    def will_read(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Start reading a tensor (or its rows) from the disk in the background (safetensors.will_read)."""
        from ellama_megatron.formats.safetensors import will_read

        path, entry = self.tensors[name]
        will_read(path, entry, rows)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][1].dtype

    def shard_of(self, name: str) -> str:
        return self.tensors[name][0].name

    def shard_tensors(self, shard: str) -> list[TensorEntry]:
        """The tensors of one shard in storage order."""
        return sorted((e for p, e in self.tensors.values() if p.name == shard), key=lambda e: e.start)

    def shard_metadata(self, shard: str) -> dict[str, str] | None:
        """The shard header's ``__metadata__`` (transformers writes {"format": "pt"})."""
        from ellama_megatron.formats.safetensors import read_metadata

        return read_metadata(self.path / shard)

    def weight_files(self) -> set[str]:
        return set(self.shards) | ({self.index_file} if self.index_file else set())
