"""Model FLOPs per optimizer step (the numerator of MFU), PaLM's convention (Chowdhery et al. 2022,
appendix B): 6 FLOPs per parameter per token (forward 2, backward 4) for every matrix multiply,
plus the attention score and value products, 12 * layers * q_width * seq per token, counted
without the causal-mask discount. Recomputation is not counted (it is hardware FLOPs, not model
FLOPs). The input embedding is a lookup, so its table is left out of N; the output layer is a
matrix multiply and is counted.
"""

from __future__ import annotations

from ellama_megatron.model.config import LlamaConfig
from ellama_megatron.plan.layouts import Layout


def matmul_params(model: LlamaConfig) -> int:
    """Parameters that take part in a matrix multiply: all but the input embedding table and norms."""
    embedding = model.vocab_size * model.hidden_size
    norms = (2 * model.num_layers + 1) * model.hidden_size
    return model.num_parameters() - embedding - norms + (embedding if model.tie_word_embeddings else 0)


def flops_per_token(model: LlamaConfig, seq_length: int) -> float:
    attention = 12 * model.num_layers * model.num_attention_heads * model.kv_channels * seq_length
    return 6 * matmul_params(model) + attention


def flops_per_step(model: LlamaConfig, layout: Layout) -> float:
    return flops_per_token(model, layout.seq_length) * layout.tokens_per_step


def mfu(model: LlamaConfig, layout: Layout, tokens_per_s_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation for a measured per-GPU throughput."""
    return tokens_per_s_per_gpu * flops_per_token(model, layout.seq_length) / (peak_tflops * 1e12)
