"""Llama 3.1 as a Megatron-Core GPTModel: the one Llama -> Megatron translation, shared by training,
convert --verify and the GPU benchmark.

The translation is Megatron's own: ``model_args`` states the architecture as Megatron-LM arguments,
Megatron's argument parser and validation read them, and ``core_transformer_config_from_args``
turns them into the TransformerConfig. Training does exactly that inside ``megatron.training``;
``transformer_config`` does the same for code that builds a model outside Megatron's loop, so a
checked or benchmarked model is the one that trains (tests/test_llama_megatron.py compares the two
field by field).

Layer spec: Transformer Engine's when TE imports (GPU clusters, NGC containers); otherwise
Megatron's local spec, with PyTorch SDPA attention (flash / cuDNN / memory-efficient kernels, see
llama/sdpa_attention.py) in place of the unfused attention that materialises the full score matrix.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import io
import sys
from collections.abc import Sequence

from ellama_megatron.llama.config import LlamaConfig

# Fusions that need CUDA kernels, Transformer Engine or apex. Off on a CPU, and off for --verify,
# whose reference (transformers) computes each step unfused.
UNFUSED_ARGS = (
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
)
# What a model needs to be built and run on a CPU: parameters made there, no fused kernels, and a
# plain RNG tracker (the CPU has no CUDA RNG).
CPU_MODEL_ARGS = ("--use-cpu-initialization", *UNFUSED_ARGS, "--inference-rng-tracker")


def model_args(m: LlamaConfig) -> list[str]:
    """The architecture of ``m`` as Megatron-LM arguments (the tokenizer and vocab padding are the
    run's: engine/megatron_args.py)."""
    args = [
        "--num-layers",
        m.num_layers,
        "--hidden-size",
        m.hidden_size,
        "--ffn-hidden-size",
        m.ffn_hidden_size,
        "--num-attention-heads",
        m.num_attention_heads,
        "--group-query-attention",
        "--num-query-groups",
        m.num_query_groups,
        "--kv-channels",
        m.kv_channels,
        "--max-position-embeddings",
        m.max_position_embeddings,
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        int(m.rotary_base),
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        m.norm_epsilon,
        "--swiglu",
        "--disable-bias-linear",
        "--attention-dropout",
        0.0,
        "--hidden-dropout",
        0.0,
        "--init-method-std",
        m.init_method_std,
    ]
    if m.rope_scaling_factor is not None:
        args += ["--use-rope-scaling", "--rope-scaling-factor", m.rope_scaling_factor]
    if not m.tie_word_embeddings:
        args += ["--untie-embeddings-and-output-weights"]
    return [str(a) for a in args]


def parse_megatron_args(argv: Sequence[str], parsed: dict | None = None):
    """Megatron-LM's parsing and validation of ``argv``, as ``megatron.training`` does for a run,
    without its global state (no global args, tokenizer or timers are set). ``parsed``, if given,
    receives the arguments as parsed, before validation changed any."""
    from megatron.training.arguments import parse_args, validate_args

    saved = sys.argv
    sys.argv = [saved[0] if saved else "ellama_megatron", *map(str, argv)]
    try:
        # validate_args prints every argument on rank 0: a training log's business, not a check's.
        with contextlib.redirect_stdout(io.StringIO()):
            args = parse_args()
            if parsed is not None:
                parsed.update(copy.deepcopy(vars(args)))
            validate_args(args)
    finally:
        sys.argv = saved
    return args


# Words in a Megatron flag's help that say the flag no longer does what its name says.
_RETIRED_FLAG_WORDS = ("deprecated", "ignored", "no-op", "no longer")


def megatron_overrides(argv: Sequence[str]) -> list[str]:
    """What Megatron-LM's validation does not honour in ``argv``, one line each: a flag whose value
    ``validate_args`` replaces or removes, a flag its own help calls deprecated or ignored, a warning
    validation raises. Megatron drops features with a warning and carries on (``--async-save``
    without ``--use-persistent-ckpt-worker``, ``--sequence-parallel`` at TP 1, ...): a user's config
    then silently trains without them. An empty list means Megatron runs what ``argv`` asks for.
    Reads the process's WORLD_SIZE / RANK and CUDA_DEVICE_MAX_CONNECTIONS as a rank would."""
    import argparse
    import warnings

    from megatron.training.arguments import add_megatron_arguments

    actions = {
        option: action
        for action in add_megatron_arguments(argparse.ArgumentParser())._actions
        for option in action.option_strings
    }
    problems, ours = [], {}
    for flag in (str(a) for a in argv if str(a).startswith("--")):
        action = actions.get(flag)
        if action is None:
            problems.append(f"{flag}: not a Megatron-LM argument")
            continue
        ours[action.dest] = flag
        if any(word in (action.help or "").lower() for word in _RETIRED_FLAG_WORDS):
            problems.append(f"{flag}: Megatron's help says: {action.help.strip()}")
    if len(ours) < sum(str(a).startswith("--") for a in argv):
        return problems  # parse_args would exit on the unknown flag: name it instead
    parsed: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = vars(parse_megatron_args(argv, parsed))
    for dest, flag in ours.items():
        if dest not in checked:
            problems.append(f"{flag}: removed by Megatron's argument checks (was {parsed[dest]!r})")
        elif checked[dest] != parsed[dest]:
            problems.append(f"{flag}: Megatron's argument checks changed {parsed[dest]!r} to {checked[dest]!r}")
    # warn_rank_0 raises UserWarnings from megatron/; argparse's own DeprecationWarnings are not about argv.
    problems += dict.fromkeys(
        f"warning: {w.message}" for w in caught if w.category is UserWarning and "megatron" in w.filename
    )
    return problems


def transformer_config(
    model: LlamaConfig,
    transformer_impl: str,
    runtime_args: Sequence[str] = (),
    seq_length: int | None = None,
    **overrides,
):
    """The TransformerConfig Megatron's loop builds for ``model`` with ``runtime_args`` (precision,
    fusions, recomputation, CPU: ``CPU_MODEL_ARGS``), for a model built outside that loop.
    ``overrides`` set what no Megatron argument sets (``perform_initialization``)."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    # Megatron's argument checks want a sequence length and a micro-batch size; neither enters the config.
    argv = model_args(model) + [
        "--transformer-impl",
        transformer_impl,
        "--seq-length",
        seq_length or model.max_position_embeddings,
        "--micro-batch-size",
        1,
        *runtime_args,
    ]
    config = core_transformer_config_from_args(parse_megatron_args(argv))
    return dataclasses.replace(config, **overrides) if overrides else config


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (the import fails where cuDNN is missing)
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
        from ellama_megatron.llama.sdpa_attention import local_layer_spec_with_sdpa

        return local_layer_spec_with_sdpa(normalization="RMSNorm")
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    model: LlamaConfig,
    config,
    spec,
    padded_vocab_size: int,
    pre_process=True,
    post_process=True,
    vp_stage=None,
    pg_collection=None,
):
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
        **({} if model.rope_scaling_factor is None else {"rope_scaling_factor": model.rope_scaling_factor}),
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
        return build_gpt_model(
            model, config, spec, args.padded_vocab_size, pre_process, post_process, vp_stage, pg_collection
        )

    return functools.wraps(provide)(provide)
