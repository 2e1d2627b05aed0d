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

# Megatron's Llama 3.1 RoPE scaling hard-codes these three (FACTS.md); another value would be
# silently ignored by the engine, so such a checkpoint is refused instead.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Files of a Hugging Face folder that travel with the weights (tokenizer and generation settings).
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja", "original/tokenizer.model",
)


class ConversionError(ValueError):
    """Bad input: the message names the file, the field and the fix."""


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers 5's ``rope_parameters`` or 4's
    ``rope_theta`` + ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    return float(theta), scaling


def llama_config_from_hf(hf: dict, name: str, source: str = "config.json") -> LlamaConfig:
    """Our LlamaConfig from a Hugging Face config.json dict; refuses what Megatron's Llama can't run."""
    def refuse(field: str, value, why: str):
        raise ConversionError(f"{source}: {field}={value!r}: {why}")

    if hf.get("model_type") != "llama":
        refuse("model_type", hf.get("model_type"), "only Llama (model_type=llama: Llama 3, 3.1, 3.2 text) is supported")
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if arch != ["LlamaForCausalLM"]:
        refuse("architectures", arch, "only LlamaForCausalLM is supported")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, hf[field], "biases are not part of Llama 3 and the engine builds none")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf.get("hidden_act"), "Llama uses SwiGLU (silu)")
    theta, scaling = rope_settings(hf)
    factor = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            refuse("rope_scaling.rope_type", rope_type, "only 'llama3' (Llama 3.1/3.2) or no scaling (Llama 3) is supported")
        for key, fixed in MEGATRON_LLAMA3_ROPE.items():
            if float(scaling.get(key, fixed)) != fixed:
                refuse(f"rope_scaling.{key}", scaling.get(key), f"Megatron fixes it at {fixed:g}")
        factor = float(scaling["factor"])
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    hidden = int(hf["hidden_size"])
    if heads % groups:
        refuse("num_key_value_heads", groups, f"must divide num_attention_heads={heads}")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return LlamaConfig(
        name=name,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=int(hf.get("head_dim") or hidden // heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        rotary_base=theta,
        rope_scaling_factor=factor,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        bos_token_id=int(hf["bos_token_id"]) if hf.get("bos_token_id") is not None else 0,
        eos_token_id=int(eos) if eos is not None else 0,
    )


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
        except KeyError as e:
            raise ConversionError(f"{cfg_path}: required field {e} missing") from None
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
