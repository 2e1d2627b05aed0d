"""A Hugging Face Llama folder, checked before any conversion work starts.

Everything that can make a conversion fail (architecture, RoPE type, missing or damaged shards,
tensor shapes, tokenizer size) is found here, reading only headers, so a bad input costs seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ellama_megatron.formats.safetensors import SafetensorsError, TensorEntry, read_header, read_tensor
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.hf import UnsupportedConfig, llama_config_from_hf

# Files of a Hugging Face folder that travel with the weights (tokenizer and generation settings).
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja", "original/tokenizer.model",
)


class ConversionError(ValueError):
    """Bad input: the message names the file, the field and the fix."""


def tokenizer_size(folder: Path) -> int | None:
    """Number of token ids tokenizer.json can produce (max id + 1), or None without one."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tok = json.loads(path.read_text())
        ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a tokenizers JSON file ({e})") from None
    return max(ids) + 1 if ids else 0


@dataclass
class HFCheckpoint:
    folder: Path
    hf_config: dict
    config: LlamaConfig
    tensors: dict[str, tuple[Path, TensorEntry]]

    @classmethod
    def open(cls, folder: str | Path) -> "HFCheckpoint":
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise ConversionError(f"{cfg_path}: missing; --hf-dir must be a Hugging Face model folder")
        try:
            hf_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from None
        try:
            config = llama_config_from_hf(hf_config, folder.name, str(cfg_path))
        except UnsupportedConfig as e:
            raise ConversionError(str(e)) from None
        return cls(folder, hf_config, config, _index_tensors(folder))

    def read(self, name: str) -> torch.Tensor:
        path, entry = self.tensors[name]
        return read_tensor(path, entry)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name][1].dtype

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor present with its shape; nothing unknown besides RoPE buffers."""
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            raise ConversionError(
                f"{self.folder}: tensors missing from the safetensors files: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); is the download complete?"
            )
        unknown = sorted(n for n in set(self.tensors) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
        if unknown:
            raise ConversionError(f"{self.folder}: tensors this Llama config does not have: {unknown[:5]}; "
                                  "config.json and the weights disagree")
        for name, shape in expected.items():
            if self.shape(name) != tuple(shape):
                raise ConversionError(f"{self.tensors[name][0]}: {name} has shape {self.shape(name)}, "
                                      f"config.json implies {tuple(shape)}")
        vocab = tokenizer_size(self.folder)
        if vocab is not None and vocab > self.config.vocab_size:
            raise ConversionError(
                f"{self.folder / 'tokenizer.json'}: the tokenizer has {vocab} ids but the embedding has "
                f"{self.config.vocab_size} rows (config.json vocab_size); the tokenizer belongs to another model"
            )


def _index_tensors(folder: Path) -> dict[str, tuple[Path, TensorEntry]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ConversionError(f"{folder}: no model.safetensors.index.json or model.safetensors "
                              "(only safetensors weights are read; convert .bin files first)")
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise ConversionError(f"{index}: lists shards that are not in the folder: {missing}; download them")
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for f in files:
        try:
            header = read_header(folder / f)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from None
        for name, entry in header.items():
            tensors[name] = (folder / f, entry)
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors or tensors[name][0].name != f:
                raise ConversionError(f"{index}: maps {name} to {f}, which does not contain it (corrupt shard or index)")
    return tensors
