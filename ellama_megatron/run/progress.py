"""How far a run has come, read from its run folder: the iteration of its last checkpoint, and
whether its token budget is spent. The Slurm launcher, the sweep and the sweep table all decide
from these, so "finished" means one thing."""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.formats import megatron_checkpoint

DONE_FILE = "done.json"  # in run_dir once the token budget is spent (written by the engine's rank 0)
LATEST_ITERATION_FILE = f"checkpoints/{megatron_checkpoint.TRACKER_FILE}"  # Megatron's own tracker


def saved_iteration(run_dir: str | Path) -> int:
    """The iteration of the run's last complete checkpoint; 0 before the first save."""
    return megatron_checkpoint.saved_iteration(Path(run_dir) / "checkpoints")


def is_finished(run_dir: str | Path, train_iterations: int) -> bool:
    """done.json, or a checkpoint at the last iteration: a run killed between its last save and
    done.json must not train again."""
    return (Path(run_dir) / DONE_FILE).exists() or saved_iteration(run_dir) >= train_iterations
