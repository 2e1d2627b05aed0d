"""A Hugging Face Llama folder written tensor by tensor: shards <= 5 GB, index, configs.

config.json carries RoPE in both forms (FACTS.md): transformers 5 reads ``rope_parameters``;
transformers 4 reads ``rope_theta`` + ``rope_scaling`` and, without them, silently runs Llama 3.1
with the wrong positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ellama_megatron.formats.safetensors import StreamingWriter
from ellama_megatron.llama.config import LlamaConfig

MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
INDEX_FILE = "model.safetensors.index.json"


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

    def __init__(self, folder: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.shards = plan_shards(tensors, max_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shard = -1
        self._writer: StreamingWriter | None = None
        self.total_size = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer.complete:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            self._writer = StreamingWriter(self.folder / self.files[self._shard], self.shards[self._shard],
                                           metadata={"format": "pt"})
        self._writer.write(name, tensor)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        weight_map = {name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def hf_config_dict(cfg: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM that transformers 4.x and 5.x both read the same way."""
    from ellama_megatron.testing.tiny_llama import hf_llama_config

    d = hf_llama_config(cfg).to_dict()
    rope = dict(d.get("rope_parameters") or {})
    d["rope_theta"] = float(cfg.rotary_base)
    d["rope_scaling"] = None if cfg.rope_scaling_factor is None else {
        k: v for k, v in rope.items() if k != "rope_theta"
    }
    d["architectures"] = ["LlamaForCausalLM"]
    dtype_name = str(dtype).removeprefix("torch.")
    d["dtype"] = dtype_name
    d["torch_dtype"] = dtype_name  # the key transformers 4 reads
    d.pop("transformers_version", None)
    return d


def generation_config_dict(cfg: LlamaConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
