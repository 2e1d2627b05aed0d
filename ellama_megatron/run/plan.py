"""RunPlan: the numbers of one training run, derived once from a composed config and checked once.

World size, TP/PP/CP/VP, data-parallel size, micro-batches per step, tokens per step, iterations
for the token budget, the padded vocabulary and the save interval (with ``checkpoint.save_interval:
auto``, Young/Daly's from the failure rate and the save time) are computed here and nowhere else:
the Megatron argv, the memory planner, the launchers and the demo read them from a RunPlan.
``problems()`` is the one layout check (what Megatron would refuse, or run wrongly), each message
naming the key to change and how.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ellama_megatron.llama.config import LlamaConfig, flops_per_step
from ellama_megatron.run.model_source import run_model
from ellama_megatron.run.schema import SAVE_INTERVAL_AUTO, ConfigError, typed

# Megatron pads the vocabulary to a multiple of this x TP (its --make-vocab-size-divisible-by;
# Llama 3's 128256 = 1002 x 128), so every TP rank holds an equal, aligned slice of the embedding.
VOCAB_DIVISIBLE_BY = 128

GB = 1e9  # storage bandwidth in decimal GB/s, as storage vendors and fio state it
HOUR = 3600.0


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


def young_daly_seconds(save_seconds: float, mtbf_seconds: float) -> float:
    """The save interval that loses the least time to failures, to first order (Young 1974, Daly
    2006): sqrt(2 x the time a save blocks x the job's mean time between failures)."""
    return math.sqrt(2.0 * save_seconds * mtbf_seconds)


def lost_fraction(interval_seconds: float, save_seconds: float, mtbf_seconds: float) -> float:
    """Share of the time lost with a save every ``interval_seconds``, to first order: each interval
    pays one save, and each failure (one per MTBF) redoes half an interval on average."""
    return save_seconds / interval_seconds + interval_seconds / (2.0 * mtbf_seconds)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _positive(value: float | None) -> float | None:
    """A configured figure usable in the save-interval model; None when missing or not positive
    (the schema refuses the latter by key, ClusterConfig.problems)."""
    return value if value is not None and value > 0 else None


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / HOUR:.1f} h"


def _bytes(n: float) -> str:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.01 else f"{100 * fraction:.2g}%"


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
    # What the save interval is planned from (conf/cluster, conf/checkpoint; docs/planner.md). A plan
    # made without them (benchmarks/gpu_step.py) has no save-interval figures.
    gpu_peak_tflops: float | None = None
    expected_mfu: float | None = None
    node_mtbf_hours: float | None = None
    checkpoint_write_gb_per_s: float | None = None
    configured_save_interval: int | str | None = None  # checkpoint.save_interval: iterations or "auto"
    keep_every: int | None = None
    save_optim: bool = True
    async_save: bool = False

    @classmethod
    def from_cfg(cls, cfg: Any) -> RunPlan:
        """The plan of a composed config (conf/config.yaml: model, parallel, train, optim, cluster).

        Only reads and derives; ``check()`` says whether Megatron can run it."""
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        model = LlamaConfig.from_dict(run_model(cfg)[0], "config.model")
        p, t, cluster, optim, ckpt = (
            typed(cfg, group) for group in ("parallel", "train", "cluster", "optim", "checkpoint")
        )
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
            gpu_peak_tflops=cluster.gpu_peak_tflops,
            expected_mfu=cluster.expected_mfu,
            node_mtbf_hours=cluster.node_mtbf_hours,
            checkpoint_write_gb_per_s=cluster.checkpoint_write_gb_per_s,
            configured_save_interval=ckpt.save_interval,
            keep_every=ckpt.keep_every,
            save_optim=ckpt.save_optim,
            async_save=ckpt.async_save,
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

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one weight (and one activation element) in the training precision."""
        return 2 if self.precision == "bf16" else 4

    @property
    def flops_per_step(self) -> float:
        """Model FLOPs of one optimizer step (PaLM's convention, llama/config.py)."""
        return flops_per_step(self.model, self.seq_length, self.tokens_per_step)

    # -- the save interval against the failure rate (docs/planner.md) -----------------------------

    @property
    def checkpoint_parameters(self) -> int:
        """Parameters one checkpoint holds: the model's, with the embedding (and an untied output
        layer) padded to the padded vocabulary, as Megatron holds and saves them."""
        m = self.model
        padding = (self.padded_vocab_size - m.vocab_size) * m.hidden_size
        return m.num_parameters() + padding * (1 if m.tie_word_embeddings else 2)

    @property
    def checkpoint_bytes_per_parameter(self) -> int:
        """A torch_dist checkpoint stores each tensor once (data-parallel copies are not repeated):
        the weights in the training precision; with save_optim, Megatron's optimizer adds the fp32
        main params (its distributed optimizer saves them as fp32_param even for fp32 weights; the
        plain fp32 optimizer has none) and Adam's two fp32 moments."""
        if not self.save_optim:
            return self.dtype_bytes
        main_params = 0 if self.precision == "fp32" and not self.distributed_optimizer else 4
        return self.dtype_bytes + main_params + 2 * 4

    @property
    def checkpoint_bytes(self) -> int:
        return self.checkpoint_parameters * self.checkpoint_bytes_per_parameter

    @property
    def save_seconds(self) -> float | None:
        """Seconds a save stops training: the checkpoint, written by every node at once at
        cluster.checkpoint_write_gb_per_s each. This is a synchronous save; with async_save only
        the copy to host memory blocks, so it is an upper bound (docs/planner.md)."""
        per_node = _positive(self.checkpoint_write_gb_per_s)
        return self.checkpoint_bytes / (self.nodes * per_node * GB) if per_node else None

    @property
    def job_mtbf_seconds(self) -> float | None:
        """Mean time between failures of the whole job: any of its nodes failing stops it."""
        node = _positive(self.node_mtbf_hours)
        return node * HOUR / self.nodes if node else None

    @property
    def step_seconds(self) -> float | None:
        """An optimizer step at cluster.expected_mfu of cluster.gpu_peak_tflops on every GPU; None
        without either (no estimate)."""
        peak, mfu = _positive(self.gpu_peak_tflops), _positive(self.expected_mfu)
        return self.flops_per_step / (self.world_size * peak * 1e12 * mfu) if peak and mfu else None

    @property
    def young_daly_seconds(self) -> float | None:
        save, mtbf = self.save_seconds, self.job_mtbf_seconds
        return young_daly_seconds(save, mtbf) if save and mtbf else None

    @property
    def young_daly_iterations(self) -> int | None:
        """The Young/Daly interval in whole optimizer steps (at least one)."""
        optimum, step = self.young_daly_seconds, self.step_seconds
        return max(1, round(optimum / step)) if optimum and step else None

    def lost_fraction(self, interval_iterations: int) -> float | None:
        """Share of the time lost to saves and redone work with a save every ``interval_iterations``."""
        save, mtbf, step = self.save_seconds, self.job_mtbf_seconds, self.step_seconds
        return lost_fraction(interval_iterations * step, save, mtbf) if save and mtbf and step else None

    @property
    def save_interval(self) -> int | None:
        """Iterations between saves (Megatron's --save-interval): checkpoint.save_interval, or with
        auto the Young/Daly interval; with checkpoint.keep_every set, auto takes the divisor of
        keep_every that loses the least time, so the iterations kept are ones saved. None for a plan
        made without a checkpoint config."""
        if self.configured_save_interval != SAVE_INTERVAL_AUTO:
            return self.configured_save_interval
        optimum = self.young_daly_iterations
        if optimum is None:
            raise ConfigError(self._auto_unresolved())
        if not self.keep_every or self.keep_every < 1:
            return optimum
        return min(_divisors(self.keep_every), key=self.lost_fraction)

    def _auto_unresolved(self) -> str:
        missing = [
            f"cluster.{key}"
            for key, value in (
                ("gpu_peak_tflops", self.gpu_peak_tflops),
                ("expected_mfu", self.expected_mfu),
                ("node_mtbf_hours", self.node_mtbf_hours),
                ("checkpoint_write_gb_per_s", self.checkpoint_write_gb_per_s),
            )
            if _positive(value) is None
        ]
        return (
            f"checkpoint.save_interval={SAVE_INTERVAL_AUTO} needs the step time and the save time, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; set "
            f"{'it' if len(missing) == 1 else 'them'} (docs/planner.md) or give checkpoint.save_interval "
            "as a number of iterations"
        )

    def save_interval_lines(self) -> list[str]:
        """The save interval against the failure rate, as a launch and tools/plan.py print it; empty
        without a failure rate or a write bandwidth."""
        save, mtbf, step, optimum = self.save_seconds, self.job_mtbf_seconds, self.step_seconds, self.young_daly_seconds
        if optimum is None:
            return []
        blocking = "; with async_save only the copy to host memory blocks, so less" if self.async_save else ""
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        lines = [
            f"checkpoint {_bytes(self.checkpoint_bytes)} ({self.checkpoint_bytes_per_parameter} bytes x "
            f"{_count(self.checkpoint_parameters)} parameters): a save blocks about {_duration(save)} at "
            f"{nodes} x {self.checkpoint_write_gb_per_s:g} GB/s (cluster.checkpoint_write_gb_per_s)" + blocking,
            f"job MTBF {_duration(mtbf)} (cluster.node_mtbf_hours={self.node_mtbf_hours:g} / {nodes}); "
            + (
                f"a step about {_duration(step)} at cluster.expected_mfu={self.expected_mfu:g}"
                if step
                else "no step-time estimate (cluster.gpu_peak_tflops or expected_mfu is null)"
            ),
        ]
        best = lost_fraction(optimum, save, mtbf)
        if step is None:
            lines.append(
                f"Young/Daly save interval {_duration(optimum)} ({_percent(best)} of the time lost to saves and "
                f"rework); configured: every {self.configured_save_interval} iterations (checkpoint.save_interval)"
            )
            return lines
        iterations = self.young_daly_iterations
        beyond = (
            f" (longer than the run's {self.train_iterations:,}: it saves at the end and on SIGTERM only)"
            if iterations > self.train_iterations
            else ""
        )
        lines.append(
            f"Young/Daly save interval sqrt(2 x save x MTBF) = {_duration(optimum)} = {iterations:,} iterations"
            + beyond
        )
        interval = self.save_interval
        source = (
            f"checkpoint.save_interval={SAVE_INTERVAL_AUTO}"
            + (f", a divisor of keep_every={self.keep_every}" if self.keep_every else "")
            if self.configured_save_interval == SAVE_INTERVAL_AUTO
            else "checkpoint.save_interval"
        )
        lines.append(
            f"save every {interval:,} iterations ({source}, {_duration(interval * step)}): "
            f"{_percent(self.lost_fraction(interval))} of the time lost to saves and rework, {_percent(best)} at "
            "the optimum"
        )
        return lines

    def save_interval_figures(self) -> dict[str, Any]:
        """The same as numbers (tools/plan.py --json); None where an input is missing."""
        step, interval = self.step_seconds, None
        if self.configured_save_interval != SAVE_INTERVAL_AUTO or self.young_daly_iterations is not None:
            interval = self.save_interval
        optimum = self.young_daly_seconds
        return {
            "checkpoint_bytes": self.checkpoint_bytes,
            "save_seconds": self.save_seconds,
            "job_mtbf_hours": self.job_mtbf_seconds / HOUR if self.job_mtbf_seconds else None,
            "step_seconds": step,
            "young_daly_seconds": optimum,
            "young_daly_iterations": self.young_daly_iterations,
            "save_interval": interval,
            "lost_fraction": self.lost_fraction(interval) if interval else None,
            "lost_fraction_at_optimum": (
                lost_fraction(optimum, self.save_seconds, self.job_mtbf_seconds) if optimum else None
            ),
        }

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
            *self.save_interval_lines(),
        ]

    # -- the one layout check -------------------------------------------------------------------

    def on_nodes(self, nodes: int) -> RunPlan:
        """The same run on another number of nodes: same global batch, so more or less gradient
        accumulation (check ``problems()`` to see whether the layout divides)."""
        return dataclasses.replace(self, nodes=nodes)

    def fewest_nodes_below(self, available: int, least: int) -> int | None:
        """The most nodes, from ``available`` down to ``least``, on which this run's layout divides
        (TP x PP x CP into the ranks, micro batch x DP into the global batch); None when none does."""
        for nodes in range(min(available, self.nodes), least - 1, -1):
            if not self.on_nodes(nodes).problems():
                return nodes
        return None

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
        if self.configured_save_interval == SAVE_INTERVAL_AUTO and self.young_daly_iterations is None:
            errors.append(self._auto_unresolved())
        return errors

    def check(self) -> RunPlan:
        """Raise LayoutError listing every problem; returns the plan itself when it can run."""
        errors = self.problems()
        if errors:
            raise LayoutError("invalid layout:\n  - " + "\n  - ".join(errors))
        return self
