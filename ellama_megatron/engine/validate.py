"""Checks a resolved config before anything expensive happens (seconds, not after the model build).

Each message says which key is wrong, why, and what would fix it.
"""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.engine.megatron_args import world_size
from ellama_megatron.llama.config import LlamaConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys and the fix."""


def check_layout(cfg, model: LlamaConfig) -> list[str]:
    p, t = cfg.parallel, cfg.train
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    errors = []
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("context_parallel_size", cp)):
        if value < 1:
            errors.append(f"parallel.{key}={value} must be >= 1")
    if errors:
        return errors
    ws = world_size(cfg)
    mp = tp * pp * cp
    if ws % mp:
        errors.append(
            f"world size {ws} (cluster.nodes={cfg.cluster.nodes} x cluster.procs_per_node="
            f"{cfg.cluster.procs_per_node}) is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {mp}; "
            f"change the parallel layout or the number of processes"
        )
        return errors
    dp = ws // mp
    if model.num_attention_heads % tp:
        errors.append(f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
                      f"parallel.tensor_model_parallel_size={tp}")
    if model.num_query_groups % tp:
        errors.append(f"model.num_query_groups={model.num_query_groups} is not divisible by "
                      f"parallel.tensor_model_parallel_size={tp}: each TP rank must hold whole KV groups; "
                      f"use TP in {[d for d in range(1, model.num_query_groups + 1) if model.num_query_groups % d == 0]}")
    vp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vp or 1)
    if model.num_layers % stages:
        errors.append(f"model.num_layers={model.num_layers} is not divisible by pipeline stages "
                      f"(parallel.pipeline_model_parallel_size={pp} x virtual={vp or 1})")
    if vp and pp == 1:
        errors.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        errors.append("train.micro_batch_size and train.global_batch_size must be >= 1")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x DP = "
            f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}; pick a global batch that is a multiple"
        )
    if t.seq_length > model.max_position_embeddings:
        errors.append(f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
                      f"{model.max_position_embeddings}")
    if cp > 1 and t.seq_length % (2 * cp):
        errors.append(f"train.seq_length={t.seq_length} must be divisible by 2 x context_parallel_size={2 * cp}")
    if float(t.train_tokens) <= 0:
        errors.append(f"train.train_tokens={t.train_tokens} must be positive")
    if cfg.cluster.accelerator == "cpu" and cp > 1:
        errors.append("context parallelism needs GPUs (cluster.accelerator=cpu)")
    return errors


def check_data(blend: dict) -> list[str]:
    errors = []
    if not blend["train"]:
        errors.append("no training data: set data.train, data.blend_file or data.groups (conf/data)")
    if not blend["valid"]:
        errors.append("no validation sets: set data.valid {domain: [prefix]} so each domain's loss is logged")
    prefixes = [d["prefix"] for d in blend["train"]]
    for domain, domain_prefixes in blend["valid"].items():
        if not domain_prefixes:
            errors.append(f"data.valid.{domain} is empty")
        prefixes += list(domain_prefixes)
    for d in blend["train"]:
        if float(d["weight"]) <= 0:
            errors.append(f"training blend weight {d['weight']} for {d['prefix']} must be positive")
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not Path(str(prefix) + ext).exists():
                errors.append(f"dataset file {prefix}{ext} not found (prefixes are paths without .bin/.idx; "
                              f"make them with tools/preprocess_data.py)")
    return errors


def check_known_choices(cfg) -> list[str]:
    errors = []
    if cfg.cluster.accelerator not in ("cpu", "gpu"):
        errors.append(f"cluster.accelerator={cfg.cluster.accelerator!r} must be cpu or gpu")
    if cfg.optim.lr_decay_style not in ("cosine", "linear", "constant", "WSD", "inverse-square-root"):
        errors.append(f"optim.lr_decay_style={cfg.optim.lr_decay_style!r} is not a Megatron decay style")
    if cfg.optim.precision not in ("bf16", "fp32"):
        errors.append(f"optim.precision={cfg.optim.precision!r} must be bf16 or fp32")
    if cfg.parallel.recompute_granularity not in (None, "selective", "full"):
        errors.append(f"parallel.recompute_granularity={cfg.parallel.recompute_granularity!r} must be null, "
                      f"selective or full")
    if cfg.launch not in ("torchrun", "none"):
        errors.append(f"launch={cfg.launch!r} must be torchrun or none")
    init = cfg.checkpoint.init_from
    if init and not Path(init).exists():
        errors.append(f"checkpoint.init_from={init} does not exist; convert the base model with "
                      f"tools/convert_hf.py import --out {init}")
    return errors


def validate(cfg, model: LlamaConfig, blend: dict) -> None:
    """Raise ConfigError listing every problem found."""
    errors = check_known_choices(cfg) + check_layout(cfg, model) + check_data(blend)
    if cfg.data.get("tokenizer_dir"):
        errors += _check_tokenizer(Path(cfg.data.tokenizer_dir), model)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _check_tokenizer(path: Path, model: LlamaConfig) -> list[str]:
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return [f"data.tokenizer_dir={path} is not a Hugging Face tokenizer folder (no tokenizer.json)"]
    return []
