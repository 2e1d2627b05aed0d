"""Llama 3.1 as a Megatron-Core GPTModel: the layer spec and the model provider Megatron's loop calls.

Transformer Engine's spec when TE imports (GPU clusters, NGC containers); otherwise Megatron's local
spec, with PyTorch SDPA attention (flash / cuDNN / memory-efficient kernels) in place of the unfused
attention that materialises the full score matrix.
"""

from __future__ import annotations

import functools
import importlib.util

from ellama_megatron.llama.config import LlamaConfig


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (import fails without cuDNN: FACTS.md)
    except Exception:
        return False
    return True


def resolve_impl(transformer: str, attention: str) -> tuple[str, str]:
    """(Megatron --transformer-impl, core attention) for the config's ``impl`` choices."""
    if transformer == "auto":
        transformer = "te" if transformer_engine_available() else "local"
    if transformer == "te":
        if not transformer_engine_available():
            raise ValueError("impl.transformer=te but transformer_engine does not import; use impl.transformer=auto")
        return "transformer_engine", "te"
    if transformer != "local":
        raise ValueError(f"impl.transformer must be auto, te or local, got {transformer!r}")
    if attention == "auto":
        attention = "sdpa"
    if attention not in ("sdpa", "unfused"):
        raise ValueError(f"impl.attention must be auto, sdpa or unfused, got {attention!r}")
    return "local", attention


def layer_spec(transformer_impl: str, attention: str):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    if attention == "sdpa":
        from ellama_megatron.model.sdpa_attention import local_layer_spec_with_sdpa

        return local_layer_spec_with_sdpa(normalization="RMSNorm")
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def transformer_config(model: LlamaConfig, **overrides):
    """A TransformerConfig for ``model`` outside Megatron's loop (converter, benchmarks, tests)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=_silu(),
        add_bias_linear=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=model.init_method_std,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _silu():
    import torch.nn.functional as F

    return F.silu


def build_gpt_model(model: LlamaConfig, config, spec, padded_vocab_size: int, pre_process=True,
                    post_process=True, vp_stage=None, pg_collection=None):
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def megatron_model_provider(model: LlamaConfig, attention: str):
    """The ``model_provider`` for ``megatron.training.pretrain``: dimensions from ``model``,
    parallelism and precision from Megatron's parsed arguments."""

    def provide(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
        from megatron.training import get_args
        from megatron.training.argument_utils import core_transformer_config_from_args

        args = get_args()
        config = config or core_transformer_config_from_args(args)
        spec = layer_spec(args.transformer_impl, attention)
        return build_gpt_model(model, config, spec, args.padded_vocab_size, pre_process,
                               post_process, vp_stage, pg_collection)

    return functools.wraps(provide)(provide)
