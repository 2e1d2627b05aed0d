"""What a Hugging Face model folder holds, read without loading weights, and the checks that two
folders can be merged (same architecture, tensor names, shapes, dtypes and tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Config keys that say how a folder was written (or how its weights were first initialised), not
# what the model is.
CONFIG_KEYS_IGNORED = {"transformers_version", "_name_or_path", "name_or_path", "use_cache", "dtype", "torch_dtype",
                       "initializer_range"}
# Tokenizer-config keys that record where a tokenizer was loaded from.
TOKENIZER_KEYS_IGNORED = {"name_or_path", "tokenizer_file"}


class MergeInputError(ValueError):
    """The inputs cannot be merged; the message names the first difference and the fix."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    file: str  # shard file name inside the folder
    offset: int  # byte offset in the shard's data section (orders tensors as stored)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@dataclasses.dataclass
class HFFolder:
    path: Path
    shards: list[str]  # shard file names in index order
    tensors: dict[str, TensorInfo]
    index_file: str | None  # model.safetensors.index.json when sharded

    @classmethod
    def open(cls, path: str | Path, role: str = "model") -> "HFFolder":
        p = Path(path)
        if not p.is_dir():
            raise MergeInputError(f"{role} {p}: not a directory; give a Hugging Face model folder")
        if not (p / "config.json").exists():
            raise MergeInputError(f"{role} {p}: no config.json; give a Hugging Face model folder (save_pretrained output)")
        if (p / INDEX_NAME).exists():
            with open(p / INDEX_NAME) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
            index_file = INDEX_NAME
        elif (p / SINGLE_NAME).exists():
            shards, index_file = [SINGLE_NAME], None
        else:
            raise MergeInputError(
                f"{role} {p}: no {INDEX_NAME} or {SINGLE_NAME}; only safetensors weights can be merged "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            if not (p / shard).exists():
                raise MergeInputError(f"{role} {p}: shard {shard} listed in {INDEX_NAME} is missing")
            header = read_safetensors_header(p / shard)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), shard, meta["data_offsets"][0])
        return cls(p, shards, tensors, index_file)

    def shard_tensors(self, shard: str) -> list[TensorInfo]:
        """The tensors of one shard in storage order."""
        return sorted((t for t in self.tensors.values() if t.file == shard), key=lambda t: t.offset)

    def shard_metadata(self, shard: str) -> dict[str, str] | None:
        return read_safetensors_header(self.path / shard).get("__metadata__")

    def config(self) -> dict[str, Any]:
        """config.json as transformers reads it (normalises v4/v5 RoPE keys), minus write-time keys."""
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(self.path), local_files_only=True).to_dict()
        except Exception:  # an architecture this transformers does not know: compare the raw file
            with open(self.path / "config.json") as f:
                cfg = json.load(f)
        return {k: v for k, v in cfg.items() if k not in CONFIG_KEYS_IGNORED}

    def tokenizer_files(self) -> list[str]:
        return tokenizer_files_in(self.path)

    def weight_files(self) -> set[str]:
        return set(self.shards) | ({self.index_file} if self.index_file else set())


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Path of the first place two JSON values differ (``added_tokens[3].content``), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}".lstrip(".") + (" (missing in base)" if k not in a else " (missing in adapted)")
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where.lstrip('.') or '<root>'} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where.lstrip('.') or '<root>'} ({a!r} vs {b!r})"


def tokenizer_files_in(folder: Path) -> list[str]:
    return [n for n in TOKENIZER_FILES if (folder / n).exists()]


def compare_tokenizer_dirs(base: Path, other: Path, role: str, base_label: str | None = None,
                           other_label: str | None = None) -> None:
    """Raise MergeInputError naming the first tokenizer difference (which files, then contents).
    The labels name the models in the message when the tokenizer folders are not the model folders."""
    bl, ol = base_label or str(base), other_label or str(other)
    bt, ot = tokenizer_files_in(base), tokenizer_files_in(other)
    if bt != ot:
        only_b = sorted(set(bt) - set(ot))
        only_o = sorted(set(ot) - set(bt))
        raise MergeInputError(
            f"tokenizer files differ: {only_b or 'none'} only in base {bl}, {only_o or 'none'} only in "
            f"{role} {ol}; copy the base model's tokenizer files into both folders"
        )
    for name in bt:
        pb, po = base / name, other / name
        if name.endswith(".json"):
            with open(pb) as f:
                jb = json.load(f)
            with open(po) as f:
                jo = json.load(f)
            if isinstance(jb, dict) and isinstance(jo, dict):
                jb = {k: v for k, v in jb.items() if k not in TOKENIZER_KEYS_IGNORED}
                jo = {k: v for k, v in jo.items() if k not in TOKENIZER_KEYS_IGNORED}
            diff = first_difference(jb, jo)
        else:
            diff = None if pb.read_bytes() == po.read_bytes() else "contents"
        if diff:
            raise MergeInputError(
                f"tokenizer differs: {name} in base {bl} and {role} {ol} differ at {diff}; "
                "models trained with different tokenizers cannot be merged"
            )


def _compare_tokenizers(base: HFFolder, other: HFFolder, role: str) -> None:
    compare_tokenizer_dirs(base.path, other.path, role)


def check_mergeable(base: HFFolder, other: HFFolder, role: str = "adapted") -> None:
    """Raise MergeInputError naming the first difference: architecture, tensor names, shapes, dtypes, tokenizer."""
    diff = first_difference(base.config(), other.config())
    if diff:
        raise MergeInputError(
            f"architecture differs: config.json of base {base.path} and {role} {other.path} differ at {diff}; "
            "only models of the same architecture can be merged"
        )
    names_b, names_o = set(base.tensors), set(other.tensors)
    if names_b != names_o:
        missing = sorted(names_b - names_o)
        extra = sorted(names_o - names_b)
        first = (
            f"{missing[0]} is in base but not in {role}" if missing else f"{extra[0]} is in {role} but not in base"
        )
        raise MergeInputError(
            f"tensor names differ ({len(missing)} only in base, {len(extra)} only in {role}): {first} "
            f"(base {base.path}, {role} {other.path})"
        )
    for name in sorted(names_b):
        tb, to = base.tensors[name], other.tensors[name]
        if tb.shape != to.shape:
            raise MergeInputError(
                f"tensor shapes differ: {name} is {list(tb.shape)} in base {base.path} but {list(to.shape)} "
                f"in {role} {other.path}"
            )
    for name in sorted(names_b):
        tb, to = base.tensors[name], other.tensors[name]
        if tb.dtype != to.dtype:
            raise MergeInputError(
                f"tensor dtypes differ: {name} is {tb.dtype} in base {base.path} but {to.dtype} in {role} "
                f"{other.path}; re-save one of them in the other's dtype"
            )
    _compare_tokenizers(base, other, role)
