"""Per-GPU memory of a Megatron-Core training layout for a Llama 3.1 model, in bytes.

Formulas and their sources are in docs/planner.md. The estimate is for the most loaded GPU:
pipeline stage 0 (most micro-batches in flight, the embedding) or the last stage (output layer
and logits), whichever is larger.
"""

from __future__ import annotations

import dataclasses

from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.plan.layouts import Layout, padded_vocab_size

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
    h, f = model.hidden_size, model.ffn_hidden_size
    q = model.num_attention_heads * model.kv_channels
    kv = 2 * model.num_query_groups * model.kv_channels
    return (h * (q + kv) + q * h + 3 * h * f) / tp + 2 * h


def layer_activation_bytes(model: LlamaConfig, layout: Layout) -> float:
    """Activations one transformer block keeps for backward, for one micro-batch.

    Stored tensors (bf16, 2 bytes each element; fp32 runs 4): attention norm input, QKV input,
    Q, K, V, attention context; MLP norm input, fc1 input, fc1 output [gate; up] (2f), SwiGLU
    output (f). Llama has no dropout, so no masks. The 4 norm/linear inputs are sharded by TP only
    with sequence parallel. Without fused (flash) attention and without selective recompute, the
    softmax output a*s^2 is kept too, in fp32 and in the compute dtype.
    """
    b = 2 if layout.precision == "bf16" else 4
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


def activation_bytes(model: LlamaConfig, layout: Layout, stage: str) -> float:
    """Activations of one pipeline stage at the peak of the 1F1B (or interleaved) schedule."""
    b = 2 if layout.precision == "bf16" else 4
    s = layout.seq_length / layout.cp
    mbs = layout.micro_batch_size
    p = layout.pp
    h = model.hidden_size
    layers = model.num_layers / p
    per_layer = layer_activation_bytes(model, layout)
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
        v = padded_vocab_size(model, layout.tp)
        # Final norm input, logits (compute dtype) and the fp32 softmax the vocab-parallel cross
        # entropy keeps for backward.
        total += s * mbs * (2 * h * b / sp_shard + v / layout.tp * (b + 4))
    return total


def stage_params(model: LlamaConfig, layout: Layout, stage: str) -> float:
    layers = model.num_layers / layout.pp
    v = padded_vocab_size(model, layout.tp)
    params = layers * layer_params_per_gpu(model, layout.tp)
    if stage in ("first", "only"):
        params += v * model.hidden_size / layout.tp  # word embeddings
    if stage in ("last", "only"):
        params += model.hidden_size  # final norm
        if not model.tie_word_embeddings or layout.pp > 1:
            params += v * model.hidden_size / layout.tp  # output layer
    return params


def estimate_stage(model: LlamaConfig, layout: Layout, stage: str) -> MemoryEstimate:
    params = stage_params(model, layout, stage)
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
    activations = activation_bytes(model, layout, stage)
    subtotal = weights + grads + optimizer + activations
    allowance = ALLOWANCE_FIXED_BYTES + ALLOWANCE_FRACTION * subtotal
    return MemoryEstimate(stage, int(params), weights, grads, optimizer, activations, allowance)


def estimate_memory(model: LlamaConfig, layout: Layout) -> MemoryEstimate:
    """The most loaded GPU of the layout."""
    if layout.pp == 1:
        return estimate_stage(model, layout, "only")
    return max((estimate_stage(model, layout, s) for s in ("first", "last")), key=lambda e: e.total)
