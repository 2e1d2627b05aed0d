"""The Llama 3.1 architecture as data: one dataclass, filled from conf/model/<preset>.yaml, with the
numbers that follow from its dimensions alone (parameters, model FLOPs).

Everything that needs a dimension (engine, converter, planner, exporter) reads it from here, so
conf/model/*.yaml stay the single source of each number.

Model FLOPs (the numerator of MFU) follow PaLM's convention (Chowdhery et al. 2022, appendix B):
6 FLOPs per parameter per token (forward 2, backward 4) for every matrix multiply, plus the
attention score and value products, 12 * layers * q_width * seq per token, counted without the
causal-mask discount. Recomputation is not counted (it is hardware FLOPs, not model FLOPs). The
input embedding is a lookup, so its table is left out of N; the output layer is a matrix multiply
and is counted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ellama_megatron import CONF_DIR


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float
    rope_scaling_factor: float | None
    norm_epsilon: float
    tie_word_embeddings: bool
    init_method_std: float
    bos_token_id: int
    eos_token_id: int

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> LlamaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d))
        if unknown or missing:
            raise ValueError(
                f"{source}: model config does not match LlamaConfig: "
                f"unknown keys {unknown}, missing keys {missing}; see conf/model/llama31_8b.yaml"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Exact parameter count (no vocab padding)."""
        h = self.hidden_size
        per_layer = layer_matmul_params(self) + 2 * h  # and the two RMSNorm weights
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


# What a checkpoint's weights and forward pass do not depend on: the preset's label, the scale of a
# random init that loaded weights replace, and the special ids (they describe the tokenizer and data).
# Two configs equal in every other field are the same architecture.
NON_ARCHITECTURE_FIELDS = ("name", "init_method_std", "bos_token_id", "eos_token_id")


def preset_names() -> list[str]:
    # auto.yaml is no preset: it stands for the model recorded beside checkpoint.init_from
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "auto")


def load_model_config(name_or_path: str | Path) -> LlamaConfig:
    """A preset name from conf/model (``llama31_8b``) or a path to such a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_DIR / "model" / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown model preset {str(name_or_path)!r}; known presets: {', '.join(preset_names())}")
    with open(path) as f:
        return LlamaConfig.from_dict(yaml.safe_load(f), source=str(path))


def layer_matmul_params(model: LlamaConfig) -> int:
    """One transformer block's matrix weights: Q, K and V, the attention output, SwiGLU's gate, up and down."""
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    kv = 2 * model.num_query_groups * model.kv_channels
    return h * (q + kv) + q * h + 3 * h * f


def matmul_params(model: LlamaConfig) -> int:
    """Parameters that take part in a matrix multiply: all but the input embedding table and norms.
    The output layer multiplies whether or not it shares the embedding's table."""
    return model.num_layers * layer_matmul_params(model) + model.vocab_size * model.hidden_size


def attention_flops_per_token(model: LlamaConfig, seq_length: int, causal: bool = False) -> float:
    """The score and value products (QK^T, PV) of one training token, forward and backward.

    PaLM's count takes the full s x s square (causal=False); a causal kernel computes only the lower
    triangle, half of it (causal=True: the work the GPU benchmark's MFU charges)."""
    full = 12 * model.num_layers * model.num_attention_heads * model.kv_channels * seq_length
    return full // 2 if causal else full


def flops_per_token(model: LlamaConfig, seq_length: int) -> float:
    """Model FLOPs of one training token by PaLM's convention (the module docstring)."""
    return 6 * matmul_params(model) + attention_flops_per_token(model, seq_length)


def flops_per_step(model: LlamaConfig, seq_length: int, tokens_per_step: int) -> float:
    return flops_per_token(model, seq_length) * tokens_per_step
