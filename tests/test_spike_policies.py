"""What a rejected loss does to a run (resilience.spike_policy: stop, skip, rollback), early spikes,
and checkpoint retention (checkpoint.keep_last/keep_every). Real recipes/cpt.py runs where slow."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import rejections, run_cpt
from test_resilience import fake_checkpoint

from ellama_megatron.formats.megatron_checkpoint import (
    TRACKER_FILE,
    complete_iterations,
    prune_checkpoints,
    retained_iterations,
    roll_back_to,
)
from ellama_megatron.run.events import RESULT_REJECTED_FILE, read_events
from ellama_megatron.run.progress import DONE_FILE
from ellama_megatron.run.recovery import after_rejection, relaunches, rollback_target, skipped_iterations


def saved(run_dir: Path) -> list[int]:
    return complete_iterations(run_dir / "checkpoints")


def tracker(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / TRACKER_FILE).read_text().strip()


# -- retention -----------------------------------------------------------------------------------


def test_retention_keeps_the_last_k_every_nth_and_what_a_rollback_needs():
    complete = [10, 20, 30, 40, 50, 60]
    assert retained_iterations(complete, None, None) == set(complete)
    assert retained_iterations(complete, 2, None) == {50, 60}
    assert retained_iterations(complete, 1, 20) == {20, 40, 60}
    assert retained_iterations(complete, 1, None, keep_from=40) == {40, 50, 60}


def test_pruning_deletes_only_complete_checkpoints_and_never_the_trackers(tmp_path):
    for i in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, i)
    fake_checkpoint(tmp_path, 10, complete=False)  # a save in flight: neither counted nor touched
    (tmp_path / TRACKER_FILE).write_text("6")  # an async save (8) complete before the tracker moved
    assert prune_checkpoints(tmp_path, keep_last=1, keep_every=4) == [2]
    assert complete_iterations(tmp_path) == [4, 6, 8]
    assert (tmp_path / "iter_0000010").is_dir() and not list(tmp_path.glob(".deleting-*"))


def test_rolling_back_points_the_tracker_at_the_checkpoint_and_deletes_later_ones(tmp_path):
    for i in (2, 4, 5):
        fake_checkpoint(tmp_path, i)
    (tmp_path / TRACKER_FILE).write_text("5")
    assert roll_back_to(tmp_path, 2) == [4, 5]
    assert complete_iterations(tmp_path) == [2] and (tmp_path / TRACKER_FILE).read_text() == "2"


# -- the decision after a rejected loss ----------------------------------------------------------


def rejection_line(status: str, iteration: int = 6) -> str:
    return (
        f"ts=2026-12-02 06:49:06.1 node=n1 device=0 jobID=N/A rank=0 iteration={iteration} "
        f"status=RerunValidationStatus.{status} result=123.0 message='Spiky loss'\n"
    )


def resilience(policy: str, max_relaunches: int = 3, rollback_distance: int = 2):
    return SimpleNamespace(spike_policy=policy, max_relaunches=max_relaunches, rollback_distance=rollback_distance)


def rejected_run(tmp_path: Path, status: str = "FIRST_RERUN_REPRODUCIBLE") -> Path:
    """A run whose iteration 5 was rejected: periodic saves 2 and 4, and Megatron's save of 4 for the rerun."""
    run_dir = tmp_path / "run"
    for i in (2, 4):
        fake_checkpoint(run_dir / "checkpoints", i)
    (run_dir / "checkpoints" / TRACKER_FILE).write_text("4")
    (run_dir / RESULT_REJECTED_FILE).write_text(rejection_line(status))
    return run_dir


@pytest.mark.parametrize(
    "policy,resumed_from,skipped,kept", [("skip", 4, [5], [2, 4]), ("rollback", 2, [3, 4, 5], [2])]
)
def test_skip_and_rollback_set_up_the_relaunch_and_log_it(tmp_path, policy, resumed_from, skipped, kept):
    run_dir = rejected_run(tmp_path)
    assert after_rejection(run_dir, resilience(policy), 16) is True
    assert saved(run_dir) == kept and tracker(run_dir) == str(resumed_from)
    (event,) = read_events(run_dir)
    assert (event["policy"], event["resumed_from"], event["skipped"]) == (policy, resumed_from, skipped)
    assert event["iteration"] == 6, "the event keeps Megatron's own number for the rejection"
    assert skipped_iterations(run_dir) == skipped and relaunches(run_dir) == 1


def test_the_relaunches_are_capped_and_a_transient_fault_or_stop_ends_the_run(tmp_path):
    run_dir = rejected_run(tmp_path)
    assert after_rejection(run_dir, resilience("skip", max_relaunches=1), 16) is True
    (run_dir / RESULT_REJECTED_FILE).write_text(rejection_line("FIRST_RERUN_REPRODUCIBLE", 7))
    assert after_rejection(run_dir, resilience("skip", max_relaunches=1), 16) is False
    assert read_events(run_dir)[-1]["action"] == "stop: resilience.max_relaunches=1 relaunches already made"
    transient = rejected_run(tmp_path / "t", "FIRST_RERUN_NOT_REPRODUCIBLE")
    assert after_rejection(transient, resilience("rollback"), 17) is False
    assert read_events(transient)[-1]["action"].startswith("stop: rollback is for a result that reproduces")
    assert saved(transient) == [2, 4], "a stop deletes nothing"
    too_far = rejected_run(tmp_path / "f")
    assert after_rejection(too_far, resilience("rollback", rollback_distance=4), 16) is False
    assert "no complete checkpoint at least 4 iteration(s) before iteration 5" in read_events(too_far)[-1]["action"]
    assert after_rejection(too_far, resilience("rollback"), 0) is False and len(read_events(too_far)) == 1


def test_slurm_requeues_a_result_diagnosed_correct_on_another_node_under_skip(domain_data, tmp_path, monkeypatch):
    """Exit 16 was requeued elsewhere (test_resilience.py); there the result reproduced: exit 17 with
    Megatron's SECOND_RERUN_REPRODUCIBLE. Under skip the job goes on past the iteration."""
    import os

    from conftest import composed, data_overrides
    from test_resilience import fake_scontrol, slurm_env

    from ellama_megatron.launch import slurm
    from ellama_megatron.launch.prepare import prepare

    run_dir = tmp_path / "run"
    config = prepare(composed(*data_overrides(domain_data), f"run_dir={run_dir}", "resilience.spike_policy=skip"))
    fake_checkpoint(run_dir / "checkpoints", 4)
    (run_dir / "checkpoints" / TRACKER_FILE).write_text("4")
    (run_dir / RESULT_REJECTED_FILE).write_text(rejection_line("SECOND_RERUN_REPRODUCIBLE"))
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")  # never the machine's real scontrol
    assert slurm.end_job(config, "", 17, 4, tmp_path, slurm_env(tmp_path)) == 0
    assert calls.read_text().splitlines() == ["requeue 4242"]
    (event,) = read_events(run_dir)
    assert (event["rejection"], event["resumed_from"], event["skipped"]) == ("result_rejected", 4, [5])


def test_rollback_target_is_the_newest_checkpoint_far_enough_back():
    assert rollback_target([2, 4, 6], rejected=7, distance=2) == 4
    assert rollback_target([2, 4, 6], rejected=7, distance=4) == 2
    assert rollback_target([2, 4, 6], rejected=3, distance=2) is None


def test_policy_keys_are_checked(domain_data, tmp_path):
    from conftest import composed, data_overrides

    from ellama_megatron.launch.prepare import prepare
    from ellama_megatron.run.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        prepare(
            composed(
                *data_overrides(domain_data),
                f"run_dir={tmp_path}",
                "resilience.spike_policy=rollback",
                "resilience.rerun_mode=disabled",
                "resilience.rollback_distance=1",
                "checkpoint.keep_last=0",
                "checkpoint.keep_every=15",
            )
        )
    message = str(err.value)
    assert "resilience.spike_policy=rollback needs resilience.rerun_mode=validate_results" in message
    assert "resilience.rollback_distance=1 must be at least 2" in message
    assert "checkpoint.keep_last=0 must be at least 1" in message
    assert "checkpoint.keep_every=15 must be a positive multiple of checkpoint.save_interval=10" in message


# -- real runs -----------------------------------------------------------------------------------

ONE_RANK = ["cluster.procs_per_node=1"]  # each launch starts one rank: the policies are launcher-level


@pytest.mark.slow
def test_an_early_blow_up_is_caught_and_skip_gives_up_on_a_broken_model(domain_data, tmp_path):
    """optim.lr=1e3: loss 6.2 at iteration 1, ~1e7 from iteration 2 on (the first step broke the
    model). Caught at iteration 2, long before Megatron's 100-loss window; skip relaunches once
    from the model of iteration 1, whose next iteration (the relaunch's first, judged against the
    run's reference) is rejected too; the cap stops the run. Nothing is trained past iteration 1:
    the second launch's save for its rerun (iteration 2, the data of 2 skipped) is the same model."""
    run_dir = tmp_path / "run"
    proc, log = run_cpt(
        run_dir,
        domain_data,
        "optim.lr=1e3",
        "optim.min_lr=1e3",
        "train.train_tokens=4096",
        "resilience.spike_policy=skip",
        "resilience.max_relaunches=1",
        *ONE_RANK,
        timeout=600,
    )
    assert proc.returncode == 16, proc.stderr[-3000:]
    assert saved(run_dir) == [1, 2] and tracker(run_dir) == "2" and not (run_dir / DONE_FILE).exists()
    skip, stop = rejections(run_dir)
    assert (skip["check"], skip["resumed_from"], skip["skipped"]) == ("Spiky loss", 1, [2])
    assert stop["check"] == "Spiky loss" and stop["action"].startswith("stop: resilience.max_relaunches=1")
    assert sorted(log.train_loss) == [1], "only iteration 1's loss is trained on"
    assert json.loads((run_dir / "loss_reference.json").read_text())["count"] >= 1


@pytest.mark.slow
def test_a_rollback_ends_with_the_losses_of_a_run_that_skips_its_window_from_the_start(domain_data, tmp_path):
    """A NaN at iteration 4 (saves every 2): rolled back to iteration 2, iterations 3-4 skipped.
    checkpoint.keep_last=1 in both runs: the reference keeps only its last checkpoint, the rollback
    run also the one a rejection at its next iteration would roll back to."""
    common = ["train.train_tokens=5120", "checkpoint.save_interval=2", "checkpoint.keep_last=1", *ONE_RANK]
    rolled = tmp_path / "rolled"
    proc, log = run_cpt(
        rolled,
        domain_data,
        *common,
        "resilience.spike_policy=rollback",
        "resilience.rollback_distance=2",
        "resilience.inject_loss_at=4",
        "resilience.inject_loss_kind=nan",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (event,) = rejections(rolled)
    assert (event["check"], event["resumed_from"], event["skipped"], event["deleted"]) == (
        "found NaN in local forward loss calculation",
        2,
        [3, 4],
        [3],
    )
    assert saved(rolled) == [2, 5] and (rolled / DONE_FILE).exists()
    reference = tmp_path / "reference"
    proc, ref_log = run_cpt(reference, domain_data, *common, "resilience.iterations_to_skip=[3,4]", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saved(reference) == [5]
    assert sorted(ref_log.train_loss) == [1, 2, 5]
    assert log.train_loss[5] == ref_log.train_loss[5] and log.train_loss[2] == ref_log.train_loss[2]
