"""The weight table between Hugging Face Llama and Megatron GPTModel, and the few ways a row maps.

Megatron names are the keys of GPTModel.sharded_state_dict() at TP=1 PP=1: per-layer weights are
one key stacked on a leading layer axis (the layer number is the offset on that axis, global also
under PP), and both layer-norm specs use the Transformer Engine names there. The state-dict names
(what ``model.state_dict()`` holds) differ between the local and TE specs only for the two norms.
Layouts are as Megatron-Bridge and NeMo use them (FACTS.md, "Weight layout").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ellama_megatron.llama.config import LlamaConfig


class Direct:
    """Same tensor on both sides."""

    def hf_shapes(self, cfg: LlamaConfig, megatron_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [megatron_shape]

    def megatron_shape(self, cfg, padded_vocab, hf_shapes):
        return hf_shapes[0]

    def to_megatron(self, cfg, padded_vocab, tensors):
        return tensors[0]

    def to_hf(self, cfg, tensor):
        return [tensor]


class FusedQKV:
    """[q; k; v] -> per query group g: its heads/groups query heads, then k_g, then v_g (dim 0).
    TP splits dim 0 into whole groups, so each rank gets its own heads' q, k and v."""

    def _split(self, cfg):
        per_group = cfg.num_attention_heads // cfg.num_query_groups
        return per_group, cfg.kv_channels

    def hf_shapes(self, cfg, megatron_shape):
        per_group, d = self._split(cfg)
        h = megatron_shape[1]
        return [(cfg.num_attention_heads * d, h), (cfg.num_query_groups * d, h), (cfg.num_query_groups * d, h)]

    def megatron_shape(self, cfg, padded_vocab, hf_shapes):
        return ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels, hf_shapes[0][1])

    def to_megatron(self, cfg, padded_vocab, tensors):
        q, k, v = tensors
        per_group, d = self._split(cfg)
        g, h = cfg.num_query_groups, q.shape[1]
        q = q.reshape(g, per_group * d, h)
        k = k.reshape(g, d, h)
        v = v.reshape(g, d, h)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)

    def to_hf(self, cfg, tensor):
        per_group, d = self._split(cfg)
        g, h = cfg.num_query_groups, tensor.shape[1]
        grouped = tensor.reshape(g, (per_group + 2) * d, h)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        return [q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()]


class GatedMLP:
    """linear_fc1 = [gate; up] on dim 0 (Megatron splits gate and up separately under TP)."""

    def hf_shapes(self, cfg, megatron_shape):
        return [(megatron_shape[0] // 2, megatron_shape[1])] * 2

    def megatron_shape(self, cfg, padded_vocab, hf_shapes):
        return (2 * hf_shapes[0][0], hf_shapes[0][1])

    def to_megatron(self, cfg, padded_vocab, tensors):
        return torch.cat(tensors, dim=0)

    def to_hf(self, cfg, tensor):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]


class PaddedVocab:
    """Embedding / output rows: zero rows appended up to Megatron's padded vocab; dropped on export.
    Zero output rows give the padding logits 0, the smallest disturbance of Megatron's softmax."""

    def hf_shapes(self, cfg, megatron_shape):
        return [(cfg.vocab_size, megatron_shape[1])]

    def megatron_shape(self, cfg, padded_vocab, hf_shapes):
        return (padded_vocab, hf_shapes[0][1])

    def to_megatron(self, cfg, padded_vocab, tensors):
        (t,) = tensors
        if padded_vocab == t.shape[0]:
            return t
        out = torch.zeros((padded_vocab, t.shape[1]), dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    def to_hf(self, cfg, tensor):
        return [tensor[: cfg.vocab_size].contiguous()]


DIRECT, FUSED_QKV, GATED_MLP, PADDED_VOCAB = Direct(), FusedQKV(), GatedMLP(), PaddedVocab()


@dataclass(frozen=True)
class Mapping:
    megatron: str                 # sharded key (TP=1 PP=1); per-layer keys stack layers on dim 0
    hf: tuple[str, ...]           # Hugging Face names, ``{layer}`` for the layer number
    kind: object                  # Direct / FusedQKV / GatedMLP / PaddedVocab
    per_layer: bool = False
    local_name: str | None = None  # state-dict name under Megatron's local spec when it differs
    te_name: str | None = None     # state-dict name under the Transformer Engine spec when it differs

    def hf_names(self, layer: int | None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf]

    def state_dict_name(self, layer: int | None, transformer_impl: str) -> str:
        """The name in ``model.state_dict()`` for ``transformer_impl`` ('local' or 'transformer_engine')."""
        name = self.te_name if transformer_impl == "transformer_engine" else self.local_name
        if name is None:
            name = self.megatron.replace("decoder.layers.", "decoder.layers.{layer}.") if self.per_layer else self.megatron
        return name.format(layer=layer)


_L = "model.layers.{layer}."
TABLE: tuple[Mapping, ...] = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), PADDED_VOCAB),
    Mapping("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), DIRECT,
            per_layer=True, local_name="decoder.layers.{layer}.input_layernorm.weight",
            te_name="decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight"),
    Mapping("decoder.layers.self_attention.linear_qkv.weight",
            (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
            FUSED_QKV, per_layer=True),
    Mapping("decoder.layers.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), DIRECT, per_layer=True),
    Mapping("decoder.layers.mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), DIRECT,
            per_layer=True, local_name="decoder.layers.{layer}.pre_mlp_layernorm.weight",
            te_name="decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"),
    Mapping("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
            GATED_MLP, per_layer=True),
    Mapping("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), DIRECT, per_layer=True),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), DIRECT),
    Mapping("output_layer.weight", ("lm_head.weight",), PADDED_VOCAB),
)

# Modules whose (empty, for Llama) ``_extra_state`` Megatron checkpoints as one object per layer;
# a load fails on any that is missing.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


def mappings(cfg: LlamaConfig) -> list[Mapping]:
    """The table rows for ``cfg``: tied embeddings have no output layer on either side."""
    return [m for m in TABLE if not (cfg.tie_word_embeddings and m.megatron == "output_layer.weight")]


def layers_of(m: Mapping, cfg: LlamaConfig) -> list[int | None]:
    return list(range(cfg.num_layers)) if m.per_layer else [None]


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name with its shape, in the order the exporter writes them."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
    per_layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}"] = shape
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
