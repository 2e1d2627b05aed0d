"""The memory planner: per-GPU memory of a run's layout (a RunPlan) for a Llama 3.1 model, in bytes,
its model FLOPs, the pre-launch check ``check_fits(cfg)`` and the layouts that could run instead.

Formulas and their sources are in docs/planner.md. The estimate is for the most loaded GPU:
pipeline stage 0 (most micro-batches in flight, the embedding) or the last stage (output layer
and logits), whichever is larger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from ellama_megatron.llama.config import LlamaConfig, flops_per_token, layer_matmul_params
from ellama_megatron.run.plan import RunPlan

GIB = 1024**3

# What the formulas do not count: CUDA context and cuBLAS workspaces (~1 GiB), NCCL communicator
# buffers (~1-2 GiB with TP, PP and DP groups), caching-allocator fragmentation and transient
# buffers of backward (activation gradients of the layer being processed). Stated, not measured.
ALLOWANCE_FIXED_BYTES = 3 * GIB
ALLOWANCE_FRACTION = 0.10


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    stage: str  # which pipeline stage is the most loaded: "first", "last" or "only"
    params: int  # parameters held by one GPU
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    allowance: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.allowance

    def as_gib(self) -> dict[str, float]:
        return {
            "weights": self.weights / GIB,
            "grads": self.grads / GIB,
            "optimizer": self.optimizer / GIB,
            "activations": self.activations / GIB,
            "allowance": self.allowance / GIB,
            "total": self.total / GIB,
        }


def layer_params_per_gpu(model: LlamaConfig, tp: int) -> float:
    """One transformer block on one TP rank: QKV, output projection, SwiGLU MLP split by TP; norms replicated."""
    return layer_matmul_params(model) / tp + 2 * model.hidden_size


def layer_activation_bytes(layout: RunPlan) -> float:
    """Activations one transformer block keeps for backward, for one micro-batch.

    Stored tensors (bf16, 2 bytes each element; fp32 runs 4): attention norm input, QKV input,
    Q, K, V, attention context; MLP norm input, fc1 input, fc1 output [gate; up] (2f), SwiGLU
    output (f). Llama has no dropout, so no masks. The 4 norm/linear inputs are sharded by TP only
    with sequence parallel. Without fused (flash) attention and without selective recompute, the
    softmax output a*s^2 is kept too, in fp32 and in the compute dtype.
    """
    model = layout.model
    b = layout.dtype_bytes
    s = layout.seq_length / layout.cp
    mbs = layout.micro_batch_size
    t = layout.tp
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    sp_shard = t if layout.sequence_parallel else 1
    per_token = (
        4 * h * b / sp_shard  # 2 norm inputs + QKV input + fc1 input
        + (q + 2 * kv + q) * b / t  # Q, K, V, attention context
        + 3 * f * b / t  # fc1 output (gate and up) and SwiGLU output
    )
    total = s * mbs * per_token
    if layout.recompute != "selective" and not layout.flash_attention:
        softmax_bytes = 4 + b if layout.precision == "bf16" else 4
        total += model.num_attention_heads / t * s * s * mbs * softmax_bytes
    return total


def activation_bytes(layout: RunPlan, stage: str) -> float:
    """Activations of one pipeline stage at the peak of the 1F1B (or interleaved) schedule."""
    model = layout.model
    b = layout.dtype_bytes
    s = layout.seq_length / layout.cp
    mbs = layout.micro_batch_size
    p = layout.pp
    h = model.hidden_size
    layers = model.num_layers / p
    per_layer = layer_activation_bytes(layout)
    sp_shard = layout.tp if layout.sequence_parallel else 1
    if layout.recompute == "full":
        # Keeps the input of every recompute chunk, plus one chunk recomputed in full during backward.
        chunk = layout.recompute_num_layers or 1
        per_layer_kept = s * mbs * h * b / sp_shard / chunk
        stage_layers_mem = lambda n_mb: n_mb * layers * per_layer_kept + chunk * per_layer  # noqa: E731
    else:
        stage_layers_mem = lambda n_mb: n_mb * layers * per_layer  # noqa: E731
    if stage == "last" and p > 1:
        in_flight = 1
    else:
        # Stage 0 runs p warm-up forwards before its first backward; interleaving adds (p-1)/(p*vp).
        in_flight = min(p, layout.grad_accumulation)
        if layout.vp:
            in_flight = p * (1 + (p - 1) / (p * layout.vp))
    total = stage_layers_mem(in_flight)
    if stage in ("first", "only"):
        total += in_flight * s * mbs * h * b / sp_shard  # embedding output
    if stage in ("last", "only"):
        v = layout.padded_vocab_size
        # Final norm input, logits (compute dtype) and the fp32 softmax the vocab-parallel cross
        # entropy keeps for backward.
        total += s * mbs * (2 * h * b / sp_shard + v / layout.tp * (b + 4))
    return total


def stage_params(layout: RunPlan, stage: str) -> float:
    model = layout.model
    layers = model.num_layers / layout.pp
    v = layout.padded_vocab_size
    params = layers * layer_params_per_gpu(model, layout.tp)
    if stage in ("first", "only"):
        params += v * model.hidden_size / layout.tp  # word embeddings
    if stage in ("last", "only"):
        params += model.hidden_size  # final norm
        if not model.tie_word_embeddings or layout.pp > 1:
            params += v * model.hidden_size / layout.tp  # output layer
    return params


def estimate_stage(layout: RunPlan, stage: str) -> MemoryEstimate:
    params = stage_params(layout, stage)
    if layout.precision == "bf16":
        # bf16 weights, fp32 gradient buffer (Megatron accumulates and reduces grads in fp32),
        # fp32 master weights + Adam m + v.
        weight_b, grad_b, optim_b = 2, 4, 12
    else:
        weight_b, grad_b, optim_b = 4, 4, 8  # fp32 weights are their own master copy
    # The distributed optimizer shards its state over the data-parallel ranks (including CP).
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    weights = params * weight_b
    grads = params * grad_b
    optimizer = params * optim_b / shards
    activations = activation_bytes(layout, stage)
    subtotal = weights + grads + optimizer + activations
    allowance = ALLOWANCE_FIXED_BYTES + ALLOWANCE_FRACTION * subtotal
    return MemoryEstimate(stage, int(params), weights, grads, optimizer, activations, allowance)


def estimate_memory(layout: RunPlan) -> MemoryEstimate:
    """The most loaded GPU of the layout."""
    if layout.pp == 1:
        return estimate_stage(layout, "only")
    return max((estimate_stage(layout, s) for s in ("first", "last")), key=lambda e: e.total)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """The planner's answer for one run: its memory on the busiest GPU against the GPU's."""

    layout: RunPlan
    memory: MemoryEstimate
    gpu_memory_gb: float | None  # the limit checked against (GB as GPU vendors count: 80 GB H100 = 80 GiB usable-ish)
    gpu_peak_tflops: float | None

    @property
    def model(self) -> LlamaConfig:
        return self.layout.model

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gb is None or self.memory.total <= self.gpu_memory_gb * GIB

    @property
    def flops_per_step(self) -> float:
        return self.layout.flops_per_step

    def as_dict(self) -> dict[str, Any]:
        L = self.layout
        return {
            "model": self.model.name,
            "world_size": L.world_size,
            "nodes": L.nodes,
            "procs_per_node": L.procs_per_node,
            "tp": L.tp,
            "pp": L.pp,
            "vp": L.vp,
            "cp": L.cp,
            "dp": L.dp,
            "sequence_parallel": L.sequence_parallel,
            "recompute": L.recompute,
            "micro_batch_size": L.micro_batch_size,
            "global_batch_size": L.global_batch_size,
            "grad_accumulation": L.grad_accumulation,
            "seq_length": L.seq_length,
            "tokens_per_step": L.tokens_per_step,
            "train_iterations": L.train_iterations,
            "params_per_gpu": self.memory.params,
            "memory_gib": {k: round(v, 2) for k, v in self.memory.as_gib().items()},
            "memory_stage": self.memory.stage,
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": self.fits,
            "model_tflops_per_step": round(self.flops_per_step / 1e12, 1),
            "model_gflops_per_token": round(flops_per_token(self.model, L.seq_length) / 1e9, 2),
        }

    def table(self) -> str:
        d = self.as_dict()
        m = d["memory_gib"]
        limit = f"{self.gpu_memory_gb:g} GB" if self.gpu_memory_gb else "no limit (cluster.gpu_memory_gb=null)"
        vp = f" (VP {d['vp']})" if d["vp"] else ""
        rows = [
            ("model", f"{d['model']} ({self.model.num_parameters() / 1e9:.2f}B parameters)"),
            ("world size", f"{d['world_size']} = {d['nodes']} nodes x {d['procs_per_node']}"),
            ("TP / PP / CP / DP", f"{d['tp']} / {d['pp']}{vp} / {d['cp']} / {d['dp']}"),
            ("sequence parallel, recompute", f"{d['sequence_parallel']}, {d['recompute']}"),
            (
                "micro / global batch",
                f"{d['micro_batch_size']} / {d['global_batch_size']} sequences of {d['seq_length']}",
            ),
            ("gradient accumulation", f"{d['grad_accumulation']} micro-batches per step per DP rank"),
            ("tokens per step", f"{d['tokens_per_step']:,}"),
            ("iterations for the token budget", f"{d['train_iterations']:,}"),
            (
                "model FLOPs per step",
                f"{d['model_tflops_per_step']:,.1f} TFLOP ({d['model_gflops_per_token']} GFLOP/token)",
            ),
            ("parameters on the busiest GPU", f"{d['params_per_gpu'] / 1e9:.3f}B ({d['memory_stage']} pipeline stage)"),
            ("  weights", f"{m['weights']:.2f} GiB"),
            ("  gradients", f"{m['grads']:.2f} GiB"),
            ("  optimizer state", f"{m['optimizer']:.2f} GiB"),
            ("  activations", f"{m['activations']:.2f} GiB"),
            ("  allowance", f"{m['allowance']:.2f} GiB"),
            ("memory per GPU", f"{m['total']:.2f} GiB of {limit}: {'fits' if self.fits else 'DOES NOT FIT'}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def refusal(self) -> str:
        m = self.memory.as_gib()
        return (
            f"layout {self.layout.describe()} of {self.model.name} needs {m['total']:.1f} GiB per GPU "
            f"(weights {m['weights']:.1f} + grads {m['grads']:.1f} + optimizer {m['optimizer']:.1f} + "
            f"activations {m['activations']:.1f} + allowance {m['allowance']:.1f}) but the GPU has "
            f"{self.gpu_memory_gb:g} GB (cluster.gpu_memory_gb); raise parallel.tensor_model_parallel_size "
            "or pipeline_model_parallel_size, use parallel.recompute_granularity=selective/full, or "
            "lower train.micro_batch_size (python tools/plan.py --list-layouts shows layouts that fit)"
        )


def report_for(layout: RunPlan, gpu_memory_gb: float | None, gpu_peak_tflops: float | None = None) -> MemoryReport:
    return MemoryReport(layout, estimate_memory(layout), gpu_memory_gb, gpu_peak_tflops)


def check_fits(cfg: Any) -> MemoryReport:
    """The pre-launch check: a MemoryReport; `report.fits` False means refuse with `report.refusal()`.

    Raises LayoutError (every problem of the layout) for a layout Megatron cannot run at all.
    """
    plan = RunPlan.from_cfg(cfg).check()
    cluster = cfg["cluster"]
    return report_for(plan, cluster.get("gpu_memory_gb"), cluster.get("gpu_peak_tflops"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(base: RunPlan, max_cp: int = 4) -> Iterator[RunPlan]:
    """Every valid (TP, PP, CP) for base's node count, TP inside a node, keeping the rest of base.

    VP is kept from base where it still divides the layers; sequence parallel follows TP > 1.
    """
    layers = base.model.num_layers
    for tp in _divisors(base.procs_per_node):
        for cp in (c for c in (1, 2, 4, 8) if c <= max_cp):
            for pp in _divisors(layers):
                if base.world_size % (tp * pp * cp):
                    continue
                vp = base.vp if base.vp and pp > 1 and layers % (pp * base.vp) == 0 else None
                candidate = dataclasses.replace(base, tp=tp, pp=pp, cp=cp, vp=vp, sequence_parallel=tp > 1)
                if not candidate.problems():
                    yield candidate
