"""A training layout (how the model and batch are split over GPUs), read from a composed config,
checked for divisibility, and enumerated for a node count."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

from ellama_megatron.llama.config import LlamaConfig

# Megatron pads the vocabulary to a multiple of this times TP (its --make-vocab-size-divisible-by).
VOCAB_DIVISIBLE_BY = 128


class LayoutError(ValueError):
    """A layout Megatron would reject; the message names the config field and a fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
    nodes: int
    procs_per_node: int
    tp: int
    pp: int
    cp: int
    vp: int | None  # interleaved pipeline chunks per stage
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str | None  # None, "selective" or "full"
    recompute_num_layers: int | None
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_tokens: float
    precision: str  # bf16 or fp32
    flash_attention: bool  # GPU runs use Transformer Engine's fused attention (no s^2 activations)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def grad_accumulation(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def train_iterations(self) -> int:
        return train_iterations(self.train_tokens, self.global_batch_size, self.seq_length)

    def describe(self) -> str:
        vp = f" VP{self.vp}" if self.vp else ""
        return f"TP{self.tp} PP{self.pp}{vp} CP{self.cp} DP{self.dp}"


def train_iterations(train_tokens: float, global_batch_size: int, seq_length: int) -> int:
    """Optimizer steps for a token budget, as the engine counts them (ellama_megatron.engine.megatron_args)."""
    return max(1, math.ceil(float(train_tokens) / (global_batch_size * seq_length)))


def padded_vocab_size(model: LlamaConfig, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return math.ceil(model.vocab_size / multiple) * multiple


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
    return default if node is None else node


def layout_from_cfg(cfg: Any) -> Layout:
    """The layout of a composed config (conf/config.yaml: parallel, train, cluster, optim)."""
    recompute = _get(cfg, "parallel.recompute_granularity")
    accelerator = _get(cfg, "cluster.accelerator", "gpu")
    precision = _get(cfg, "optim.precision", "bf16") if accelerator == "gpu" else "fp32"
    return Layout(
        nodes=int(_get(cfg, "cluster.nodes", 1)),
        procs_per_node=int(_get(cfg, "cluster.procs_per_node", 1)),
        tp=int(_get(cfg, "parallel.tensor_model_parallel_size", 1)),
        pp=int(_get(cfg, "parallel.pipeline_model_parallel_size", 1)),
        cp=int(_get(cfg, "parallel.context_parallel_size", 1)),
        vp=_get(cfg, "parallel.virtual_pipeline_model_parallel_size"),
        sequence_parallel=bool(_get(cfg, "parallel.sequence_parallel", False)),
        distributed_optimizer=bool(_get(cfg, "parallel.use_distributed_optimizer", True)),
        recompute=recompute,
        recompute_num_layers=_get(cfg, "parallel.recompute_num_layers"),
        seq_length=int(_get(cfg, "train.seq_length")),
        micro_batch_size=int(_get(cfg, "train.micro_batch_size")),
        global_batch_size=int(_get(cfg, "train.global_batch_size")),
        train_tokens=float(_get(cfg, "train.train_tokens")),
        precision=precision,
        flash_attention=accelerator == "gpu",
    )


def validate(layout: Layout, model: LlamaConfig) -> None:
    """Raise LayoutError for what Megatron would refuse, naming the field to change."""
    L = layout
    model_parallel = L.tp * L.pp * L.cp
    if L.world_size % model_parallel:
        raise LayoutError(
            f"parallel: TP {L.tp} x PP {L.pp} x CP {L.cp} = {model_parallel} does not divide the world size "
            f"{L.world_size} (cluster.nodes {L.nodes} x cluster.procs_per_node {L.procs_per_node}); "
            "change parallel.* or cluster.nodes"
        )
    if model.num_attention_heads % L.tp or model.num_query_groups % L.tp:
        raise LayoutError(
            f"parallel.tensor_model_parallel_size={L.tp} must divide num_attention_heads "
            f"{model.num_attention_heads} and num_query_groups {model.num_query_groups} of model {model.name}"
        )
    stages = L.pp * (L.vp or 1)
    if model.num_layers % stages:
        raise LayoutError(
            f"parallel: PP {L.pp} x VP {L.vp or 1} = {stages} model chunks do not divide the "
            f"{model.num_layers} layers of {model.name}; change pipeline_model_parallel_size or "
            "virtual_pipeline_model_parallel_size"
        )
    if L.vp and L.pp == 1:
        raise LayoutError("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1; set it to null")
    if L.global_batch_size % (L.micro_batch_size * L.dp):
        raise LayoutError(
            f"train.global_batch_size={L.global_batch_size} is not a multiple of micro_batch_size "
            f"{L.micro_batch_size} x DP {L.dp}; use a multiple of {L.micro_batch_size * L.dp}"
        )
    if L.vp and L.grad_accumulation < L.pp:
        raise LayoutError(
            f"interleaved pipeline needs at least PP={L.pp} micro-batches per step, got {L.grad_accumulation}; "
            "raise train.global_batch_size or set parallel.virtual_pipeline_model_parallel_size=null"
        )
    if L.cp > 1 and L.seq_length % (2 * L.cp):
        raise LayoutError(f"train.seq_length={L.seq_length} must be a multiple of 2 x CP = {2 * L.cp}")
    if L.recompute not in (None, "selective", "full"):
        raise LayoutError(f"parallel.recompute_granularity={L.recompute!r}: use null, selective or full")
    if L.train_iterations < 1:
        raise LayoutError(
            f"train.train_tokens={L.train_tokens:g} is less than one step of {L.tokens_per_step} tokens "
            "(global_batch_size x seq_length)"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(base: Layout, model: LlamaConfig, max_cp: int = 4) -> Iterator[Layout]:
    """Every valid (TP, PP, CP) for base's node count, TP inside a node, keeping the rest of base.

    VP is kept from base where it still divides the layers; sequence parallel follows TP > 1.
    """
    for tp in _divisors(base.procs_per_node):
        for cp in (c for c in (1, 2, 4, 8) if c <= max_cp):
            for pp in _divisors(model.num_layers):
                if base.world_size % (tp * pp * cp):
                    continue
                vp = base.vp if base.vp and pp > 1 and model.num_layers % (pp * base.vp) == 0 else None
                candidate = dataclasses.replace(base, tp=tp, pp=pp, cp=cp, vp=vp, sequence_parallel=tp > 1)
                try:
                    validate(candidate, model)
                except LayoutError:
                    continue
                yield candidate
