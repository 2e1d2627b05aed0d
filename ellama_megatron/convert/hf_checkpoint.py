"""A Hugging Face Llama folder, checked before any conversion work starts.

Everything that can make a conversion fail (architecture, RoPE type, missing or damaged shards,
tensor shapes, tokenizer size) is found here, reading only headers, so a bad input costs seconds.
The folder's files are read by ellama_megatron.formats.hf_folder, config.json is translated by
ellama_megatron.llama.hf; this module adds what a conversion needs on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ellama_megatron.formats.hf_folder import HFFolder, HFFolderError, read_config
from ellama_megatron.formats.safetensors import TensorEntry
from ellama_megatron.formats.tokenizer_folder import TokenizerFolderError, tokenizer_size
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.hf import UnsupportedConfig, llama_config_from_hf


class ConversionError(ValueError):
    """Bad input: the message names the file, the field and the fix."""


@dataclass
class HFCheckpoint:
    files: HFFolder
    hf_config: dict
    config: LlamaConfig

    @classmethod
    def open(cls, folder: str | Path) -> HFCheckpoint:
        folder = Path(folder)
        try:
            hf_config = read_config(folder)  # the architecture is refused before any shard is read
            config = llama_config_from_hf(hf_config, folder.name, str(folder / "config.json"))
            return cls(HFFolder.open(folder), hf_config, config)
        except (HFFolderError, UnsupportedConfig) as e:
            raise ConversionError(str(e)) from None

    @property
    def folder(self) -> Path:
        return self.files.path

    @property
    def tensors(self) -> dict[str, tuple[Path, TensorEntry]]:
        return self.files.tensors

    def read(self, name: str) -> torch.Tensor:
        return self.files.read(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(name)

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
            raise ConversionError(
                f"{self.folder}: tensors this Llama config does not have: {unknown[:5]}; "
                "config.json and the weights disagree"
            )
        for name, shape in expected.items():
            if self.shape(name) != tuple(shape):
                raise ConversionError(
                    f"{self.tensors[name][0]}: {name} has shape {self.shape(name)}, config.json implies {tuple(shape)}"
                )
        try:
            vocab = tokenizer_size(self.folder)
        except TokenizerFolderError as e:
            raise ConversionError(str(e)) from None
        if vocab is not None and vocab > self.config.vocab_size:
            raise ConversionError(
                f"{self.folder / 'tokenizer.json'}: the tokenizer has {vocab} ids but the embedding has "
                f"{self.config.vocab_size} rows (config.json vocab_size); the tokenizer belongs to another model"
            )
