"""How far a run has come, read from its run folder: the iteration of its last checkpoint, and
whether its token budget is spent. The Slurm launcher, the sweep and the sweep table all decide
from these, so "finished" means one thing."""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.formats import megatron_checkpoint
from ellama_megatron.formats.atomic import write_text_atomic

DONE_FILE = "done.json"  # in run_dir once the token budget is spent (written by the engine's rank 0)
SAVE_FOLDER = "checkpoints"  # in run_dir: Megatron's --save and --load
LATEST_ITERATION_FILE = f"{SAVE_FOLDER}/{megatron_checkpoint.TRACKER_FILE}"  # Megatron's own tracker
FINAL_HF_FOLDER = "hf"  # in run_dir: the finished run's model in Hugging Face format (checkpoint.export_hf)


def save_folder(run_dir: str | Path) -> Path:
    """Where the run's checkpoints are (Megatron's save folder: iter_* and the tracker)."""
    return Path(run_dir) / SAVE_FOLDER


def saved_iteration(run_dir: str | Path) -> int:
    """The iteration of the run's last complete checkpoint; 0 before the first save."""
    return megatron_checkpoint.saved_iteration(save_folder(run_dir))


def is_finished(run_dir: str | Path, train_iterations: int) -> bool:
    """done.json, or a checkpoint at the last iteration: a run killed between its last save and
    done.json must not train again."""
    return (Path(run_dir) / DONE_FILE).exists() or saved_iteration(run_dir) >= train_iterations


def repair_tracker(run_dir: str | Path) -> str | None:
    """Make the run's tracker name a complete checkpoint before the ranks read it.

    Megatron truncates latest_checkpointed_iteration.txt before writing it, so a kill at that moment
    leaves it empty; with an empty or unreadable tracker its loader prints an error and the run ends
    (exit 0) without training. A tracker that is empty, not a number, or names a checkpoint that is
    missing or incomplete is rewritten to the newest complete iter_* (returns the warning to show);
    with no complete checkpoint to point to it is refused (CheckpointFormatError naming the file).
    None when the tracker is absent (a new run) or sound."""
    save_dir = save_folder(run_dir)
    tracker = save_dir / megatron_checkpoint.TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == megatron_checkpoint.RELEASE_DIR and megatron_checkpoint.is_checkpoint_folder(save_dir / text):
        return None
    if text.isdigit() and megatron_checkpoint.is_checkpoint_folder(
        megatron_checkpoint.iteration_folder(save_dir, int(text))
    ):
        return None
    problem = "is empty" if not text else f"names {text!r}, which is not a complete checkpoint in {save_dir}"
    complete = megatron_checkpoint.complete_iterations(save_dir)
    if not complete:
        raise megatron_checkpoint.CheckpointFormatError(
            f"{tracker}: {problem}, and {save_dir} holds no complete iter_* checkpoint to resume from; "
            "restore the checkpoints, or delete the tracker to start the run again from its beginning"
        )
    write_text_atomic(tracker, str(complete[-1]))  # as Megatron writes it
    return (
        f"warning: {tracker} {problem}; set to {complete[-1]}, the newest complete checkpoint "
        f"({megatron_checkpoint.iteration_folder(save_dir, complete[-1]).name})"
    )
