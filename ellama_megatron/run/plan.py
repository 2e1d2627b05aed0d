"""RunPlan: the numbers of one training run, derived once from a composed config and checked once.

World size, TP/PP/CP/VP, data-parallel size, micro-batches per step, tokens per step, iterations
for the token budget and the padded vocabulary are computed here and nowhere else: the Megatron
argv, the memory planner, the launchers and the demo read them from a RunPlan. ``problems()`` is
the one layout check (what Megatron would refuse, or run wrongly), each message naming the key to
change and how.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.run.model_source import run_model
from ellama_megatron.run.schema import ConfigError, typed

# Megatron pads the vocabulary to a multiple of this x TP (its --make-vocab-size-divisible-by;
# Llama 3's 128256 = 1002 x 128), so every TP rank holds an equal, aligned slice of the embedding.
VOCAB_DIVISIBLE_BY = 128


class LayoutError(ConfigError):
    """A layout Megatron would reject; the message lists every problem, each naming the key and a fix."""


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of divisible_by x TP
    (divisible_by <= 1 pads nothing)."""
    multiple = max(1, divisible_by) * tp
    return -(-vocab_size // multiple) * multiple


def train_iterations(train_tokens: float, global_batch_size: int, seq_length: int) -> int:
    """Optimizer steps that spend a token budget, rounded up to whole steps (at least one)."""
    return max(1, math.ceil(float(train_tokens) / (global_batch_size * seq_length)))


@dataclasses.dataclass(frozen=True)
class RunPlan:
    model: LlamaConfig
    nodes: int
    procs_per_node: int
    tp: int
    pp: int
    cp: int
    vp: int | None  # interleaved pipeline chunks per stage; None = not interleaved
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str | None  # None, "selective" or "full"
    recompute_num_layers: int | None
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_tokens: float
    precision: str  # bf16 or fp32: optim.precision, with auto resolved for the accelerator
    flash_attention: bool  # GPU runs use fused attention kernels (no s^2 activations kept)
    accelerator: str = "gpu"  # cpu or gpu

    @classmethod
    def from_cfg(cls, cfg: Any) -> RunPlan:
        """The plan of a composed config (conf/config.yaml: model, parallel, train, optim, cluster).

        Only reads and derives; ``check()`` says whether Megatron can run it."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        model = LlamaConfig.from_dict(run_model(cfg)[0], "config.model")
        p, t, cluster, optim = (typed(cfg, group) for group in ("parallel", "train", "cluster", "optim"))
        return cls(
            model=model,
            nodes=cluster.nodes,
            procs_per_node=cluster.procs_per_node,
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            cp=p.context_parallel_size,
            vp=p.virtual_pipeline_model_parallel_size or None,
            sequence_parallel=p.sequence_parallel,
            distributed_optimizer=p.use_distributed_optimizer,
            recompute=p.recompute_granularity,
            recompute_num_layers=p.recompute_num_layers,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            train_tokens=t.train_tokens,
            # auto: bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are slow and only worth it to
            # run the GPU's numerics (bf16 weights, fp32 main params) without one.
            precision=("bf16" if cluster.accelerator == "gpu" else "fp32")
            if optim.precision == "auto"
            else optim.precision,
            flash_attention=cluster.accelerator == "gpu",
            accelerator=cluster.accelerator,
        )

    # -- derived numbers ------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel_size

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

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.model.vocab_size, self.tp)

    @property
    def layers_per_virtual_stage(self) -> int | None:
        return self.model.num_layers // (self.pp * self.vp) if self.vp else None

    def describe(self) -> str:
        vp = f" VP{self.vp}" if self.vp else ""
        return f"TP{self.tp} PP{self.pp}{vp} CP{self.cp} DP{self.dp}"

    def summary_lines(self) -> list[str]:
        """What a launch prints before it starts: the layout and the budget in steps."""
        return [
            f"model {self.model.name}: {self.model.num_parameters() / 1e9:.2f}B parameters",
            f"world size {self.world_size} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}",
            f"micro batch {self.micro_batch_size}, global batch {self.global_batch_size} "
            f"(gradient accumulation {self.grad_accumulation})",
            f"{self.tokens_per_step:,} tokens per step, {self.train_iterations:,} iterations for "
            f"{self.train_tokens:,.0f} tokens",
        ]

    # -- the one layout check -------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every reason Megatron would refuse this layout (or run it wrongly); empty when it can run."""
        m = self.model
        errors = [
            f"parallel.{key}={value} must be >= 1"
            for key, value in (
                ("tensor_model_parallel_size", self.tp),
                ("pipeline_model_parallel_size", self.pp),
                ("context_parallel_size", self.cp),
            )
            if value < 1
        ]
        if errors:
            return errors
        if self.world_size % self.model_parallel_size:
            return [
                f"world size {self.world_size} (cluster.nodes={self.nodes} x cluster.procs_per_node="
                f"{self.procs_per_node}) is not divisible by TP x PP x CP = {self.tp} x {self.pp} x {self.cp} = "
                f"{self.model_parallel_size}; change the parallel layout or the number of processes"
            ]
        if m.num_attention_heads % self.tp:
            errors.append(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor_model_parallel_size={self.tp}"
            )
        if m.num_query_groups % self.tp:
            groups = m.num_query_groups
            errors.append(
                f"model.num_query_groups={groups} is not divisible by "
                f"parallel.tensor_model_parallel_size={self.tp}: each TP rank must hold whole KV groups; "
                f"use TP in {[d for d in range(1, groups + 1) if groups % d == 0]}"
            )
        stages = self.pp * (self.vp or 1)
        if m.num_layers % stages:
            errors.append(
                f"model.num_layers={m.num_layers} is not divisible by pipeline stages "
                f"(parallel.pipeline_model_parallel_size={self.pp} x virtual={self.vp or 1}); change "
                "pipeline_model_parallel_size or virtual_pipeline_model_parallel_size"
            )
        if self.vp and self.pp == 1:
            errors.append(
                "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1; set it to null"
            )
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            errors.append("train.micro_batch_size and train.global_batch_size must be >= 1")
        elif self.global_batch_size % (self.micro_batch_size * self.dp):
            errors.append(
                f"train.global_batch_size={self.global_batch_size} is not divisible by micro_batch_size x DP = "
                f"{self.micro_batch_size} x {self.dp} = {self.micro_batch_size * self.dp}; pick a global batch "
                "that is a multiple"
            )
        elif self.vp and self.grad_accumulation < self.pp:
            errors.append(
                f"interleaved pipeline needs at least PP={self.pp} micro-batches per step, got "
                f"{self.grad_accumulation}; raise train.global_batch_size or set "
                "parallel.virtual_pipeline_model_parallel_size=null"
            )
        if self.seq_length > m.max_position_embeddings:
            errors.append(
                f"train.seq_length={self.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}"
            )
        if self.cp > 1 and self.seq_length % (2 * self.cp):
            errors.append(
                f"train.seq_length={self.seq_length} must be divisible by 2 x context_parallel_size={2 * self.cp}"
            )
        if self.cp > 1 and self.accelerator == "cpu":
            errors.append(
                "context parallelism needs GPUs (cluster.accelerator=cpu); set parallel.context_parallel_size=1"
            )
        if self.recompute not in (None, "selective", "full"):
            errors.append(f"parallel.recompute_granularity={self.recompute!r} must be null, selective or full")
        if self.train_tokens <= 0:
            errors.append(f"train.train_tokens={self.train_tokens:g} must be positive")
        return errors

    def check(self) -> RunPlan:
        """Raise LayoutError listing every problem; returns the plan itself when it can run."""
        errors = self.problems()
        if errors:
            raise LayoutError("invalid layout:\n  - " + "\n  - ".join(errors))
        return self
