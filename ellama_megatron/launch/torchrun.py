"""recipes/cpt.py's launch: prepare the run, print its plan, then start the ranks on this machine
with torchrun (launch=torchrun) or stop with the config's path for srun (launch=none)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.run.events import (EVENTS_FILE, EXIT_RERUN_ELSEWHERE, append_event, describe, exit_report,
                                        take_rank_exit)
from ellama_megatron.run.progress import is_finished, saved_iteration
from ellama_megatron.run.schema import ConfigError
from ellama_megatron.runtime.parent_death import die_with_parent

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
        plan = prepare_plan(cfg)  # holds the run folder's lock from here to this process's exit
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_path = Path(cfg.run_dir) / CONFIG_FILE
    for line in plan.summary_lines():
        print(line)
    if is_finished(cfg.run_dir, plan.train_iterations):
        # Megatron would start, find no samples left and fail an assertion: nothing to do is success.
        print(f"run already finished (iteration {saved_iteration(cfg.run_dir)} of {plan.train_iterations} in "
              f"{cfg.run_dir}); nothing started")
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
    # torchrun dies with this process (SIGTERM: it stops its ranks); the ranks arm the same for themselves.
    code = subprocess.call(torchrun_command(plan.procs_per_node, config_path),
                           preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    return report_rejection(cfg.run_dir, take_rank_exit(cfg.run_dir, code))


def report_rejection(run_dir, code: int) -> int:
    """After the ranks: Megatron's exit 16 or 17 is recorded in events.jsonl and reported; the run
    stops either way. One machine has no other GPU to rerun on, and a relaunch here would exit 16
    again: the model from before the rejected step is the last checkpoint, to resume (after
    resilience.iterations_to_skip, or on a Slurm job that excludes this node) when understood."""
    report = exit_report(run_dir, code)
    if report is None:
        return code
    action = ("stop: a rerun on another GPU is needed, none here; the checkpoint holds the model from before the step"
              if code == EXIT_RERUN_ELSEWHERE else "stop: Megatron's diagnosis is final (a transient fault, or a result "
              "reproduced on another GPU)")
    append_event(run_dir, **{k: v for k, v in report.items() if k != "kind"}, kind=report["kind"], action=action)
    print(f"error: {describe(report)}; {action}. Logged in {Path(run_dir) / EVENTS_FILE}; last checkpoint: "
          f"iteration {saved_iteration(run_dir)}", file=sys.stderr)
    return code
