"""recipes/cpt.py's launch: prepare the run, print its plan, then start the ranks on this machine
with torchrun (launch=torchrun) or stop with the config's path for srun (launch=none)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.run.events import take_rank_exit
from ellama_megatron.run.progress import is_finished, saved_iteration
from ellama_megatron.run.recovery import after_rejection
from ellama_megatron.run.schema import ConfigError
from ellama_megatron.runtime.parent_death import die_with_parent

RANK_MODULE = "ellama_megatron.engine.train"  # one rank of the engine, however it is started


def torchrun_command(procs_per_node: int, config_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(procs_per_node),
        "-m",
        RANK_MODULE,
        "--config",
        str(config_path),
    ]


def run_recipe(cfg) -> int:
    """What recipes/cpt.py does; returns the process exit code."""
    try:
        plan = prepare_plan(cfg)  # holds the run folder's lock from here to this process's exit
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_path = Path(cfg.run_dir) / CONFIG_FILE
    for line in plan.summary_lines():
        print(line)
    if is_finished(cfg.run_dir, plan.train_iterations):
        # Megatron would start, find no samples left and fail an assertion: nothing to do is success.
        print(
            f"run already finished (iteration {saved_iteration(cfg.run_dir)} of {plan.train_iterations} in "
            f"{cfg.run_dir}); nothing started"
        )
        return 0
    if os.environ.get("ELLAMA_DRY_RUN"):
        from ellama_megatron.engine.lr_schedule import format_lr_curve

        print(format_lr_curve(cfg))
        print(f"dry run: config written to {config_path}; nothing started")
        return 0
    if cfg.launch == "none":
        print(f"ELLAMA_CONFIG={config_path}")
        return 0
    if plan.nodes != 1:
        print("error: launch=torchrun starts one node; use slurm/*.sbatch for several", file=sys.stderr)
        return 2
    take_rank_exit(cfg.run_dir, 0)  # a record a killed launch left behind is not this launch's
    while True:
        # torchrun dies with this process (SIGTERM: it stops its ranks); the ranks arm the same for themselves.
        code = subprocess.call(
            torchrun_command(plan.procs_per_node, config_path), preexec_fn=lambda: die_with_parent(signal.SIGTERM)
        )
        code = take_rank_exit(cfg.run_dir, code)
        # Megatron's exit 16/17 (a rejected loss): logged and reported; resilience.spike_policy says
        # whether the run goes on (the ranks read the iterations to skip from events.jsonl).
        if not after_rejection(cfg.run_dir, cfg.resilience, code):
            return code
