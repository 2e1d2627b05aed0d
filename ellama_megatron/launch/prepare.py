"""From a composed config to a recorded run: check it (every problem at once), lock the run folder,
make its checkpoint tracker sound, resolve the config and write it to ${run_dir}/config.yaml, which
the ranks read."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from ellama_megatron.engine.datasets import resolve_blend
from ellama_megatron.formats.atomic import write_text_atomic
from ellama_megatron.formats.megatron_checkpoint import write_record
from ellama_megatron.launch.run_lock import hold_run_lock
from ellama_megatron.run.checks import check_config
from ellama_megatron.run.plan import RunPlan
from ellama_megatron.run.progress import repair_tracker, save_folder

CONFIG_FILE = "config.yaml"  # ${run_dir}/config.yaml: the resolved config the ranks start from


def prepare(cfg) -> Path:
    """Check ``cfg`` (layout, choices, data, tokenizer and the planner's memory check), write it
    resolved to ${run_dir}/config.yaml and return that path. Raises ConfigError listing every problem."""
    prepare_plan(cfg)
    return Path(cfg.run_dir) / CONFIG_FILE


def prepare_plan(cfg) -> RunPlan:
    """``prepare``, returning the run's plan (what a launcher prints and derives from).

    The run folder is locked first (RunLockedError naming the holder when another launch has it),
    and stays locked while this process lives: config.yaml is only ever written by its one launch.
    A cut-short tracker is repaired (with a warning) or refused (CheckpointFormatError) here, before
    the ranks start: Megatron itself would end the run without training."""
    blend = resolve_blend(cfg.data, cfg.train.train_tokens, cfg.train.seq_length)
    plan = check_config(cfg, blend)
    run_dir = Path(cfg.run_dir)
    hold_run_lock(run_dir)
    save_folder(run_dir).mkdir(parents=True, exist_ok=True)
    warning = repair_tracker(run_dir)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    write_text_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    write_record(run_dir / "checkpoints", resolved)  # beside the checkpoints: export/merge/eval need no extra flags
    return plan
