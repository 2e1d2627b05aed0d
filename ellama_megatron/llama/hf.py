"""Hugging Face's config.json <-> LlamaConfig, both ways, and Llama 3.1's RoPE scaling constants.

Reading refuses what Megatron's Llama cannot run (other architectures, biases, other RoPE scalings),
naming the file, the field and why. Writing gives a config.json that transformers 4 and 5 read the
same way: RoPE in both forms, because transformers 5 reads ``rope_parameters`` while transformers 4
reads ``rope_theta`` + ``rope_scaling`` and, without them, silently runs Llama 3.1 with the wrong
positions.
"""

from __future__ import annotations

from typing import Any

from ellama_megatron.llama.config import NON_ARCHITECTURE_FIELDS, LlamaConfig

# Llama 3.1's "llama3" RoPE scaling besides its factor. Megatron-Core's rotary embedding hard-codes
# these three values, so a checkpoint with any other value would be silently run with these:
# reading refuses it, writing states them.
LLAMA3_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedConfig(ValueError):
    """A config.json this project cannot run; the message names the file, the field and why."""


def rope_parameters(cfg: LlamaConfig) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` for ``cfg`` (llama3 scaling when it has a factor)."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.rope_scaling_factor is not None:
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(cfg.rotary_base),
            "factor": float(cfg.rope_scaling_factor),
            **LLAMA3_ROPE_SCALING,
        }
    return rope


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
        raise UnsupportedConfig(f"{source}: {field}={value!r}: {why}")

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
    try:
        theta, scaling = rope_settings(hf)
        factor = None
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type != "llama3":
                refuse(
                    "rope_scaling.rope_type",
                    rope_type,
                    "only 'llama3' (Llama 3.1/3.2) or no scaling (Llama 3) is supported",
                )
            for key, fixed in LLAMA3_ROPE_SCALING.items():
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
    except KeyError as e:
        raise UnsupportedConfig(f"{source}: required field {e} missing") from None


def hf_llama_config(cfg: LlamaConfig):
    """A transformers LlamaConfig for our architecture (Llama 3.1 RoPE scaling when set)."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        head_dim=cfg.kv_channels,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=cfg.init_method_std,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        torch_dtype="float32",
    )


# Keys every transformers config carries for other model types (classification labels, encoder-decoder,
# output switches): defaults that describe no Llama, left out of what we write.
GENERIC_CONFIG_KEYS = (
    "_name_or_path",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
)


def same_architecture(cfg: LlamaConfig, source: dict, source_name: str = "config.json") -> bool:
    """Whether the source config.json describes ``cfg``'s architecture (so its keys still hold)."""
    try:
        theirs = llama_config_from_hf(source, cfg.name, source_name).to_dict()
    except UnsupportedConfig:
        return False
    ours = cfg.to_dict()
    return all(ours[k] == theirs[k] for k in ours if k not in NON_ARCHITECTURE_FIELDS)


def hf_config_dict(cfg: LlamaConfig, dtype, source: dict | None = None) -> dict:
    """config.json for LlamaForCausalLM that transformers 4.x and 5.x both read the same way;
    ``dtype`` is the torch dtype of the weights beside it. With ``source`` (the config.json the model
    was imported from) of the same architecture, its keys are kept as they were (pad_token_id,
    unk_token_id, a list of eos ids, ...): only the dtype and the RoPE forms ours would state are set."""
    if source is not None and same_architecture(cfg, source):
        d = dict(source)
        _set_rope_and_dtype(d, cfg, dtype)
        return d
    d = hf_llama_config(cfg).to_dict()
    for key in GENERIC_CONFIG_KEYS:
        d.pop(key, None)
    d["architectures"] = ["LlamaForCausalLM"]
    d.pop("transformers_version", None)
    _set_rope_and_dtype(d, cfg, dtype)
    return d


def _set_rope_and_dtype(d: dict, cfg: LlamaConfig, dtype) -> None:
    rope = rope_parameters(cfg)
    d["rope_parameters"] = rope
    d["rope_theta"] = float(cfg.rotary_base)
    d["rope_scaling"] = (
        None if cfg.rope_scaling_factor is None else {k: v for k, v in rope.items() if k != "rope_theta"}
    )
    dtype_name = str(dtype).removeprefix("torch.")
    d["dtype"] = dtype_name
    d["torch_dtype"] = dtype_name  # the key transformers 4 reads


def generation_config_dict(cfg: LlamaConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
