"""One training rank under Slurm: the engine (``python -m ellama_megatron.engine.train``), with
Megatron's checkpoint-writer helper process started deaf to SIGTERM.

    srun ... python slurm/rank.py --config RUN_DIR/config.yaml      (slurm/launch.sh, recipes/sweep.py)

Why: Slurm delivers a signal to every process of a job step, not only to the ranks. A rank
answers SIGTERM by saving a checkpoint and exiting (Megatron's exit-signal handler), but the save
reports through a helper process (megatron.core's write-results queue, a spawned multiprocessing
Manager, created at the first save) that the same SIGTERM kills first: the save then fails and
the run falls back to its previous checkpoint. A helper started while SIGTERM is ignored keeps
ignoring it (exec keeps ignored signals); Megatron installs the rank's own handler afterwards.
(With checkpoint.async_save on GPU, Megatron's persistent async writer is another such process.)
"""

import runpy
import signal


def start_checkpoint_helper_ignoring_sigterm() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        get_write_results_queue()  # created once per process; later saves reuse it
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # the helper is spawned: it re-imports the main module
    start_checkpoint_helper_ignoring_sigterm()
    runpy.run_module("ellama_megatron.engine.train", run_name="__main__", alter_sys=True)
