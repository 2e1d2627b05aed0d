"""Hugging Face folders as merge inputs: opened (ellama_megatron.formats.hf_folder) and checked
that two can be merged (same architecture, tensor names, shapes, dtypes and tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ellama_megatron.formats.hf_folder import HFFolder, HFFolderError
from ellama_megatron.formats.safetensors import DTYPE_NAMES
from ellama_megatron.merge.request import MergeInputError, compare_tokenizer_dirs, first_difference

# Config keys that say how a folder was written (or how its weights were first initialised), not
# what the model is.
CONFIG_KEYS_IGNORED = {
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "use_cache",
    "dtype",
    "torch_dtype",
    "initializer_range",
}


def open_input(path: str | Path, role: str) -> HFFolder:
    try:
        return HFFolder.open(path)
    except HFFolderError as e:
        raise MergeInputError(f"{role} {e}") from None


def model_config(folder: HFFolder) -> dict[str, Any]:
    """config.json as transformers reads it (normalises v4/v5 RoPE keys), minus write-time keys."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(folder.path), local_files_only=True).to_dict()
    except Exception:  # an architecture this transformers does not know: compare the raw file
        cfg = folder.config()
    return {k: v for k, v in cfg.items() if k not in CONFIG_KEYS_IGNORED}


def check_mergeable(base: HFFolder, other: HFFolder, role: str = "adapted") -> None:
    """Raise MergeInputError naming the first difference: architecture, tensor names, shapes, dtypes, tokenizer."""
    # Equal files need no normalising: transformers (seconds to import) is asked only when they differ.
    raw = [{k: v for k, v in f.config().items() if k not in CONFIG_KEYS_IGNORED} for f in (base, other)]
    diff = first_difference(model_config(base), model_config(other)) if raw[0] != raw[1] else None
    if diff:
        raise MergeInputError(
            f"architecture differs: config.json of base {base.path} and {role} {other.path} differ at {diff}; "
            "only models of the same architecture can be merged"
        )
    names_b, names_o = set(base.tensors), set(other.tensors)
    if names_b != names_o:
        missing = sorted(names_b - names_o)
        extra = sorted(names_o - names_b)
        first = f"{missing[0]} is in base but not in {role}" if missing else f"{extra[0]} is in {role} but not in base"
        raise MergeInputError(
            f"tensor names differ ({len(missing)} only in base, {len(extra)} only in {role}): {first} "
            f"(base {base.path}, {role} {other.path})"
        )
    for name in sorted(names_b):
        if base.shape(name) != other.shape(name):
            raise MergeInputError(
                f"tensor shapes differ: {name} is {list(base.shape(name))} in base {base.path} but "
                f"{list(other.shape(name))} in {role} {other.path}"
            )
    for name in sorted(names_b):
        if base.dtype(name) != other.dtype(name):
            raise MergeInputError(
                f"tensor dtypes differ: {name} is {DTYPE_NAMES[base.dtype(name)]} in base {base.path} but "
                f"{DTYPE_NAMES[other.dtype(name)]} in {role} {other.path}; re-save one of them in the other's dtype"
            )
    compare_tokenizer_dirs(base.path, other.path, role)
