"""The weight table between Hugging Face Llama and Megatron GPTModel: one row per Megatron tensor,
naming its Hugging Face tensors by role (``QKVMapping(q=, k=, v=)``, ``GatedMLPMapping(gate=, up=)``),
and each row's kind says how the tensors map: which rows of the Megatron tensor each Hugging Face
tensor is (``hf_rows``; the export direction and the shapes follow from it) and how they are put
together on import (``to_megatron``). Everything else is derived from the table: the Hugging Face
names and shapes a config implies (``hf_shapes``) and the order the exporter writes them in
(``hf_order``).

Megatron names are the keys of GPTModel.sharded_state_dict() at TP=1 PP=1: per-layer weights are
one key stacked on a leading layer axis (the layer number is the offset on that axis, global also
under PP), and both layer-norm specs use the Transformer Engine names there. The state-dict names
(what ``model.state_dict()`` holds) differ between the local and TE specs only for the two norms.
The tensor layouts are those Megatron-Bridge and NeMo convert with: q, k and v fused per query
group, gate and up stacked, the vocabulary padded with rows at the end.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ellama_megatron.llama.config import LlamaConfig


def _widths(cfg: LlamaConfig) -> dict[str, int]:
    """The named widths a row's shape is written in."""
    return {
        "hidden": cfg.hidden_size,
        "ffn": cfg.ffn_hidden_size,
        "q_width": cfg.num_attention_heads * cfg.kv_channels,
        "kv_width": cfg.num_query_groups * cfg.kv_channels,
    }


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One Megatron tensor and the Hugging Face tensors it is made of, by role (``roles``)."""

    megatron: str  # sharded key (TP=1 PP=1); per-layer keys stack layers on dim 0
    # state-dict names (``{layer}`` for the layer number) where they differ from the sharded key's
    local_name: str | None = dataclasses.field(default=None, kw_only=True)  # under Megatron's local spec
    te_name: str | None = dataclasses.field(default=None, kw_only=True)  # under Transformer Engine's spec

    roles: ClassVar[tuple[str, ...]] = ("hf",)

    @property
    def hf_templates(self) -> tuple[str, ...]:
        """Hugging Face name templates in role order, ``{layer}`` for the layer number."""
        return tuple(getattr(self, role) for role in self.roles)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_templates[0]

    def hf_names(self, layer: int | None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf_templates]

    def state_dict_name(self, layer: int | None, transformer_impl: str) -> str:
        """The name in ``model.state_dict()`` for ``transformer_impl`` ('local' or 'transformer_engine')."""
        name = self.te_name if transformer_impl == "transformer_engine" else self.local_name
        if name is None:
            name = (
                self.megatron.replace("decoder.layers.", "decoder.layers.{layer}.") if self.per_layer else self.megatron
            )
        return name.format(layer=layer)

    # The kind: shapes and tensors between the two sides (one layer's, for per-layer rows).
    def megatron_shape(self, cfg: LlamaConfig, padded_vocab: int) -> tuple[int, ...]:
        raise NotImplementedError

    def hf_rows(self, cfg: LlamaConfig, megatron_shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
        """Per role, the rows of a Megatron tensor of ``megatron_shape`` (dim-0 ranges [start, stop),
        in order) that its Hugging Face tensor is made of. Every Llama tensor is such a selection of
        rows, so the export is a copy of rows (``to_hf``), and where a checkpoint stores them as
        plain bytes, a copy of those bytes from file to file (convert/exporter.py)."""
        raise NotImplementedError

    def hf_shapes(self, cfg: LlamaConfig, megatron_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The Hugging Face shapes, in role order, of a Megatron tensor of ``megatron_shape``."""
        rest = tuple(megatron_shape[1:])
        return [(sum(stop - start for start, stop in rows),) + rest for rows in self.hf_rows(cfg, megatron_shape)]

    def to_megatron(self, cfg: LlamaConfig, padded_vocab: int | None, tensors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, cfg: LlamaConfig, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for rows in self.hf_rows(cfg, tuple(tensor.shape)):
            parts = [tensor[start:stop] for start, stop in rows]
            out.append(parts[0].contiguous() if len(parts) == 1 else torch.cat(parts))
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class DirectMapping(Mapping):
    """Same tensor on both sides; ``shape`` in named widths (hidden, ffn, q_width, kv_width)."""

    hf: str
    shape: tuple[str, ...]

    def megatron_shape(self, cfg, padded_vocab):
        widths = _widths(cfg)
        return tuple(widths[w] for w in self.shape)

    def hf_rows(self, cfg, megatron_shape):
        return [[(0, megatron_shape[0])]]

    def to_megatron(self, cfg, padded_vocab, tensors):
        return tensors[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabMapping(Mapping):
    """Embedding / output rows: zero rows appended up to Megatron's padded vocab; dropped on export.
    Zero output rows give the padding logits 0, the smallest disturbance of Megatron's softmax."""

    hf: str

    def megatron_shape(self, cfg, padded_vocab):
        return (padded_vocab, cfg.hidden_size)

    def hf_rows(self, cfg, megatron_shape):
        return [[(0, cfg.vocab_size)]]

    def to_megatron(self, cfg, padded_vocab, tensors):
        (t,) = tensors
        if padded_vocab == t.shape[0]:
            return t
        out = torch.zeros((padded_vocab, t.shape[1]), dtype=t.dtype)
        out[: t.shape[0]] = t
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class QKVMapping(Mapping):
    """[q; k; v] -> per query group g: its heads/groups query heads, then k_g, then v_g (dim 0).
    TP splits dim 0 into whole groups, so each rank gets its own heads' q, k and v."""

    q: str
    k: str
    v: str
    roles: ClassVar[tuple[str, ...]] = ("q", "k", "v")

    def megatron_shape(self, cfg, padded_vocab):
        return ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels, cfg.hidden_size)

    def hf_rows(self, cfg, megatron_shape):
        d = cfg.kv_channels
        q_rows = cfg.num_attention_heads // cfg.num_query_groups * d
        group = q_rows + 2 * d  # one group's rows: its query heads, its k, its v
        starts = [g * group for g in range(cfg.num_query_groups)]
        return [
            [(s, s + q_rows) for s in starts],
            [(s + q_rows, s + q_rows + d) for s in starts],
            [(s + q_rows + d, s + group) for s in starts],
        ]

    def to_megatron(self, cfg, padded_vocab, tensors):
        q, k, v = tensors
        per_group, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
        g, h = cfg.num_query_groups, q.shape[1]
        q = q.reshape(g, per_group * d, h)
        k = k.reshape(g, d, h)
        v = v.reshape(g, d, h)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedMLPMapping(Mapping):
    """linear_fc1 = [gate; up] on dim 0 (Megatron splits gate and up separately under TP)."""

    gate: str
    up: str
    roles: ClassVar[tuple[str, ...]] = ("gate", "up")

    def megatron_shape(self, cfg, padded_vocab):
        return (2 * cfg.ffn_hidden_size, cfg.hidden_size)

    def hf_rows(self, cfg, megatron_shape):
        half = megatron_shape[0] // 2
        return [[(0, half)], [(half, 2 * half)]]

    def to_megatron(self, cfg, padded_vocab, tensors):
        return torch.cat(tensors, dim=0)


# The two vocabulary-sized Hugging Face tensors, which the vocabulary extension rewrites.
HF_EMBEDDING = "model.embed_tokens.weight"
HF_OUTPUT = "lm_head.weight"
_L = "model.layers.{layer}."
# In Hugging Face's order (embeddings, a layer's tensors, final norm, head): hf_order follows it.
TABLE: tuple[Mapping, ...] = (
    VocabMapping("embedding.word_embeddings.weight", hf=HF_EMBEDDING),
    DirectMapping(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        hf=_L + "input_layernorm.weight",
        shape=("hidden",),
        local_name="decoder.layers.{layer}.input_layernorm.weight",
        te_name="decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
    ),
    QKVMapping(
        "decoder.layers.self_attention.linear_qkv.weight",
        q=_L + "self_attn.q_proj.weight",
        k=_L + "self_attn.k_proj.weight",
        v=_L + "self_attn.v_proj.weight",
    ),
    DirectMapping(
        "decoder.layers.self_attention.linear_proj.weight",
        hf=_L + "self_attn.o_proj.weight",
        shape=("hidden", "q_width"),
    ),
    DirectMapping(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        hf=_L + "post_attention_layernorm.weight",
        shape=("hidden",),
        local_name="decoder.layers.{layer}.pre_mlp_layernorm.weight",
        te_name="decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
    ),
    GatedMLPMapping(
        "decoder.layers.mlp.linear_fc1.weight", gate=_L + "mlp.gate_proj.weight", up=_L + "mlp.up_proj.weight"
    ),
    DirectMapping("decoder.layers.mlp.linear_fc2.weight", hf=_L + "mlp.down_proj.weight", shape=("hidden", "ffn")),
    DirectMapping("decoder.final_layernorm.weight", hf="model.norm.weight", shape=("hidden",)),
    VocabMapping("output_layer.weight", hf=HF_OUTPUT),
)

# Modules whose (empty, for Llama) ``_extra_state`` Megatron checkpoints as one object per layer;
# a load fails on any that is missing.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


def mappings(cfg: LlamaConfig) -> list[Mapping]:
    """The table rows for ``cfg``: tied embeddings have no output layer on either side."""
    return [m for m in TABLE if not (cfg.tie_word_embeddings and m.megatron == "output_layer.weight")]


def layers_of(m: Mapping, cfg: LlamaConfig) -> list[int | None]:
    return list(range(cfg.num_layers)) if m.per_layer else [None]


def hf_order(cfg: LlamaConfig) -> list[tuple[Mapping, int | None]]:
    """(row, layer) in Hugging Face's order: the whole-model rows before the first per-layer row,
    then layer by layer, then the rest; so the exporter holds one layer's tensors at a time and its
    shards read like Meta's."""
    rows = mappings(cfg)
    first = next(i for i, m in enumerate(rows) if m.per_layer)
    per_layer = [m for m in rows if m.per_layer]
    return (
        [(m, None) for m in rows[:first] if not m.per_layer]
        + [(m, layer) for layer in range(cfg.num_layers) for m in per_layer]
        + [(m, None) for m in rows[first:] if not m.per_layer]
    )


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name with its shape, in the order the exporter writes them."""
    shapes = {}
    for m, layer in hf_order(cfg):
        for name, shape in zip(m.hf_names(layer), m.hf_shapes(cfg, m.megatron_shape(cfg, cfg.vocab_size))):
            shapes[name] = shape
    return shapes
