"""From a composed Hydra config to running ranks: validate, resolve, record, start.

recipes/cpt.py calls ``prepare`` then ``launch``; slurm/launch.sh runs the recipe with
``launch=none`` and starts the ranks itself with srun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ellama_megatron.engine.datasets import resolve_blend
from ellama_megatron.engine.megatron_args import data_parallel_size, train_iterations, world_size
from ellama_megatron.engine.validate import ConfigError, validate
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.plan import LayoutError, check_fits


def model_config(cfg) -> LlamaConfig:
    return LlamaConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), "config.model")


def plan_lines(cfg) -> list[str]:
    p, t = cfg.parallel, cfg.train
    dp = data_parallel_size(cfg)
    iters = train_iterations(cfg)
    tokens_per_step = t.global_batch_size * t.seq_length
    return [
        f"model {cfg.model.name}: {model_config(cfg).num_parameters() / 1e9:.2f}B parameters",
        f"world size {world_size(cfg)} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x CP {p.context_parallel_size} x DP {dp}",
        f"micro batch {t.micro_batch_size}, global batch {t.global_batch_size} "
        f"(gradient accumulation {t.global_batch_size // (t.micro_batch_size * dp)})",
        f"{tokens_per_step:,} tokens per step, {iters:,} iterations for {float(t.train_tokens):,.0f} tokens",
    ]


def memory_refusal(cfg) -> str | None:
    """The planner's refusal (with its numbers) when the layout does not fit cluster.gpu_memory_gb;
    None when it fits or when no limit is set (CPU runs)."""
    if not cfg.cluster.get("gpu_memory_gb"):
        return None
    try:
        report = check_fits(cfg)
    except LayoutError:
        return None  # validate() names what is wrong with the layout itself
    return None if report.fits else f"does not fit the GPU: {report.refusal()}"


def prepare(cfg) -> Path:
    """Validate ``cfg`` (with the planner's memory check), write it resolved to
    ${run_dir}/config.yaml and return that path."""
    model = model_config(cfg)
    blend = resolve_blend(cfg.data, cfg.train.train_tokens, cfg.train.seq_length)
    refusal = memory_refusal(cfg)
    try:
        validate(cfg, model, blend)
    except ConfigError as exc:  # one message with every problem, the memory one included
        raise ConfigError(f"{exc}\n  - {refusal}" if refusal else str(exc)) from None
    if refusal:
        raise ConfigError(f"invalid configuration:\n  - {refusal}")
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    for path in (run_dir / "config.yaml", run_dir / "checkpoints" / "ellama_config.yaml"):
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)  # beside the checkpoints too: export/merge/eval need no extra flags
    return run_dir / "config.yaml"


def torchrun_command(cfg, config_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(cfg.cluster.procs_per_node),
        "-m", "ellama_megatron.engine.train", "--config", str(config_path),
    ]


def run_recipe(cfg) -> int:
    """What recipes/cpt.py does; returns the process exit code."""
    try:
        config_path = prepare(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in plan_lines(cfg):
        print(line)
    if os.environ.get("ELLAMA_DRY_RUN"):
        print(f"dry run: config written to {config_path}; nothing started")
        return 0
    if cfg.launch == "none":
        print(f"ELLAMA_CONFIG={config_path}")
        return 0
    if cfg.cluster.nodes != 1:
        print("error: launch=torchrun starts one node; use slurm/*.sbatch for several", file=sys.stderr)
        return 2
    return subprocess.call(torchrun_command(cfg, config_path))
