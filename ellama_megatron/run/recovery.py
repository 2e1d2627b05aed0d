"""What a run does after Megatron rejected a loss: resilience.spike_policy.

Megatron's rerun state machine never lets the optimizer step on a rejected loss. A result that
reproduces on a re-run in place is saved as the model from *before* the step (iteration k-1) and
the ranks exit 16; a transient one exits 17 without a save (docs/engine.md, "Resilience"). Then:

- ``stop``: the run ends with a report; the checkpoint holds the model from before the step.
- ``skip``: relaunch from the newest complete checkpoint before iteration k (Megatron's save of
  k-1), with k in Megatron's ``--iterations-to-skip``: its data is consumed, not trained on.
- ``rollback``: relaunch from the newest complete checkpoint at least ``rollback_distance``
  iterations before k, with everything from there to k skipped (PaLM's remedy for spikes: the
  batches that led the model there are passed over, not only the last one). Later checkpoints,
  a branch of the run being abandoned, are deleted.

Both relaunch only for a result that reproduced (exit 16 here, or Megatron's diagnosis "correct
result" after a rerun on another GPU): a transient fault is hardware, not data, and stops the run
like ``stop``. At most ``max_relaunches`` times per run. Every decision is an event in
``${run_dir}/events.jsonl``; the iterations skipped are read back from there by each later launch
(``skipped_iterations``), so they hold across relaunches and Slurm requeues alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ellama_megatron.formats import megatron_checkpoint
from ellama_megatron.run.events import (
    EVENTS_FILE,
    EXIT_RERUN_ELSEWHERE,
    append_event,
    describe,
    exit_report,
    read_events,
)
from ellama_megatron.run.progress import save_folder

RELAUNCH_POLICIES = ("skip", "rollback")
# Megatron's statuses (result_rejected.txt) of a rejected result that reproduced: data, not hardware.
REPRODUCED = ("FIRST_RERUN_REPRODUCIBLE", "SECOND_RERUN_REPRODUCIBLE")


def skipped_iterations(run_dir: str | Path) -> list[int]:
    """The iterations the run's skip/rollback relaunches passed over (events.jsonl), 1-based."""
    return sorted({i for event in read_events(run_dir) for i in event.get("skipped") or []})


def relaunches(run_dir: str | Path) -> int:
    """How many times skip/rollback relaunched the run (its events with a ``resumed_from``)."""
    return sum(1 for event in read_events(run_dir) if event.get("resumed_from") is not None)


def rollback_target(complete: list[int], rejected: int, distance: int) -> int | None:
    """The checkpoint a rollback from the rejected iteration resumes from: the newest complete one
    at least ``distance`` iterations before it; None when there is none."""
    eligible = [i for i in complete if i <= rejected - distance]
    return eligible[-1] if eligible else None


def prune_after_save(save_dir: str | Path, checkpoint, resilience) -> list[int]:
    """checkpoint.keep_last/keep_every, applied by rank 0 each time a save returns (every save of
    Megatron's loop goes through its save_checkpoint: periodic, final, on a signal, for a rerun).

    Megatron's own --save-retain-interval keeps only the newest checkpoint besides every N-th, and
    deletes the previous one as soon as a save ends: one checkpoint, not K, and not the older one a
    rollback resumes from. Under resilience.spike_policy=rollback the checkpoints a rejection at the
    next iteration would roll back to, and all newer ones, are kept too. Returns the iterations deleted."""
    keep_from = None
    if resilience.spike_policy == "rollback":
        complete = megatron_checkpoint.complete_iterations(save_dir)
        target = rollback_target(complete, complete[-1] + 1, resilience.rollback_distance) if complete else None
        keep_from = 0 if target is None else target  # none that old yet: any may become the target
    deleted = megatron_checkpoint.prune_checkpoints(save_dir, checkpoint.keep_last, checkpoint.keep_every, keep_from)
    if deleted:
        print(
            f"deleted checkpoints of iterations {deleted} (checkpoint.keep_last={checkpoint.keep_last}, "
            f"keep_every={checkpoint.keep_every})",
            flush=True,
        )
    return deleted


def _relaunch_plan(save_dir: Path, policy: str, distance: int, rejected: int) -> tuple[int, list[int]] | str:
    """(checkpoint to resume from, iterations to skip), or why the run cannot go on."""
    complete = megatron_checkpoint.complete_iterations(save_dir)
    resume_from = rollback_target(complete, rejected, 1 if policy == "skip" else distance)
    if resume_from is None:
        return (
            f"no complete checkpoint at least {1 if policy == 'skip' else distance} iteration(s) before "
            f"iteration {rejected} in {save_dir} to resume from"
        )
    skipped = [rejected] if policy == "skip" else list(range(resume_from + 1, rejected + 1))
    return resume_from, skipped


def after_rejection(run_dir: str | Path, resilience, code: int, **context) -> bool:
    """After the ranks of one launch on this machine: Megatron's exit 16 or 17 is logged in
    events.jsonl and reported, and when the policy goes on the save folder is set for the next
    launch (returns True: relaunch). False for any other exit, and when the run stops. ``context``
    (the launch's id, start iteration, job) goes into the event."""
    report = exit_report(run_dir, code)
    if report is None:
        return False
    save_dir = save_folder(run_dir)
    # The rejected iteration (1-based, as --iterations-to-skip counts) follows the model Megatron saved
    # for the rerun. Not the rejection log's number: 0.19's loop sets the rerun state machine's
    # counter one ahead, so the log names the iteration after it.
    policy, rejected = resilience.spike_policy, megatron_checkpoint.saved_iteration(save_dir) + 1
    relaunch = None
    if policy == "stop":
        action = (
            "stop: a rerun on another GPU is needed, none here; the checkpoint holds the model from before the step"
            if code == EXIT_RERUN_ELSEWHERE
            else "stop: Megatron's diagnosis is final (a transient fault, or a result reproduced on another GPU)"
        )
    elif report["status"] not in REPRODUCED:
        action = (
            f"stop: {policy} is for a result that reproduces (bad data); Megatron diagnosed "
            f"{report['status']} (a fault of the hardware)"
        )
    elif relaunches(run_dir) >= resilience.max_relaunches:
        action = f"stop: resilience.max_relaunches={resilience.max_relaunches} relaunches already made"
    else:
        relaunch = _relaunch_plan(save_dir, policy, resilience.rollback_distance, rejected)
        action = f"stop: {relaunch}" if isinstance(relaunch, str) else None
    if action is not None:
        append_event(
            run_dir,
            **{k: v for k, v in report.items() if k != "kind"},
            kind=report["kind"],
            action=action,
            end_iteration=megatron_checkpoint.saved_iteration(save_dir),
            **context,
        )
        print(
            f"error: {describe(report)}; {action}. Logged in {Path(run_dir) / EVENTS_FILE}; last checkpoint: "
            f"iteration {megatron_checkpoint.saved_iteration(save_dir)}",
            file=sys.stderr,
        )
        return False
    resume_from, skipped = relaunch
    deleted = megatron_checkpoint.roll_back_to(save_dir, resume_from)
    span = f"iteration {skipped[0]}" if len(skipped) == 1 else f"iterations {skipped[0]}-{skipped[-1]}"
    action = f"{policy}: relaunch from iteration {resume_from}, {span} skipped"
    append_event(
        run_dir,
        **{k: v for k, v in report.items() if k != "kind"},
        kind=report["kind"],
        action=action,
        policy=policy,
        resumed_from=resume_from,
        skipped=skipped,
        deleted=deleted,
        end_iteration=resume_from,
        **context,
    )
    print(
        f"warning: {describe(report)}; {action}"
        + (f", checkpoints {deleted} deleted" if deleted else "")
        + f" (relaunch {relaunches(run_dir)} of at most {resilience.max_relaunches})",
        file=sys.stderr,
    )
    return True
