"""recipes/cpt.py's launch: prepare the run, print its plan, then start the ranks on this machine
with torchrun (launch=torchrun) or stop with the config's path for srun (launch=none)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.run.schema import ConfigError

RANK_MODULE = "ellama_megatron.engine.train"  # one rank of the engine, however it is started


def torchrun_command(procs_per_node: int, config_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(procs_per_node),
        "-m", RANK_MODULE, "--config", str(config_path),
    ]


def run_recipe(cfg) -> int:
    """What recipes/cpt.py does; returns the process exit code."""
    try:
        plan = prepare_plan(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_path = Path(cfg.run_dir) / CONFIG_FILE
    for line in plan.summary_lines():
        print(line)
    if os.environ.get("ELLAMA_DRY_RUN"):
        print(f"dry run: config written to {config_path}; nothing started")
        return 0
    if cfg.launch == "none":
        print(f"ELLAMA_CONFIG={config_path}")
        return 0
    if plan.nodes != 1:
        print("error: launch=torchrun starts one node; use slurm/*.sbatch for several", file=sys.stderr)
        return 2
    return subprocess.call(torchrun_command(plan.procs_per_node, config_path))
