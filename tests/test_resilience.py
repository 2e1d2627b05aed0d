"""A month-long run survives its accidents: one launch per run folder, relaunches of finished or
cut-short runs, and ranks that die with their launcher. Real recipes/cpt.py subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, data_overrides, rank_processes, rejections

from ellama_megatron.formats.megatron_checkpoint import CheckpointFormatError
from ellama_megatron.launch.run_lock import LOCK_FILE
from ellama_megatron.run.progress import DONE_FILE, LATEST_ITERATION_FILE, repair_tracker


def cpt(run_dir: Path, data, *overrides: str, env: dict | None = None, timeout: int = 300):
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={run_dir}",
        *data_overrides(data),
        *TINY_RUN,
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def fake_checkpoint(save_dir: Path, iteration: int, complete: bool = True) -> Path:
    """An iter_* folder as torch_dist leaves it: complete once its metadata is written (last)."""
    folder = save_dir / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 16)
    if complete:
        (folder / ".metadata").write_bytes(b"meta")
        (folder / "common.pt").write_bytes(b"common")
    return folder


# -- clean relaunches ----------------------------------------------------------------------------


def test_a_finished_run_relaunched_exits_0_without_training(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / DONE_FILE).write_text('{"iteration": 20, "train_iters": 20}')
    proc = cpt(run_dir, domain_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run already finished" in proc.stdout and "nothing started" in proc.stdout
    assert "AssertionError" not in proc.stderr and "no samples left" not in proc.stderr


@pytest.mark.parametrize("text", ["", "  \n", "12x", "30"])  # cut short, junk, a folder that is not there
def test_a_broken_tracker_is_set_to_the_newest_complete_checkpoint(tmp_path, text):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10)
    fake_checkpoint(save_dir, 20)
    fake_checkpoint(save_dir, 25, complete=False)  # killed mid-save: never resumed from
    (save_dir / "latest_checkpointed_iteration.txt").write_text(text)
    warning = repair_tracker(tmp_path)
    assert "latest_checkpointed_iteration.txt" in warning and "set to 20" in warning
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert repair_tracker(tmp_path) is None  # sound now


def test_a_sound_or_absent_tracker_is_left_alone(tmp_path):
    assert repair_tracker(tmp_path) is None  # a new run
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10)
    fake_checkpoint(save_dir, 20)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("10")
    assert repair_tracker(tmp_path) is None
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_a_broken_tracker_without_a_complete_checkpoint_is_refused(tmp_path):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10, complete=False)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(CheckpointFormatError, match=r"latest_checkpointed_iteration.txt: is empty.*no complete iter_"):
        repair_tracker(tmp_path)
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == ""  # nothing changed


def test_the_recipe_repairs_or_refuses_an_empty_tracker_before_starting(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    save_dir = run_dir / "checkpoints"
    fake_checkpoint(save_dir, 10, complete=False)
    (run_dir / LATEST_ITERATION_FILE).write_text("")
    proc = cpt(run_dir, domain_data)
    assert proc.returncode == 2, "an empty tracker with nothing to resume must not exit 0"
    assert f"{run_dir / LATEST_ITERATION_FILE}: is empty" in proc.stderr
    fake_checkpoint(save_dir, 5)
    proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set to 5, the newest complete checkpoint" in proc.stderr
    assert (run_dir / LATEST_ITERATION_FILE).read_text() == "5"


def test_reading_a_checkpoint_through_an_empty_tracker_names_the_file(tmp_path):
    from ellama_megatron.formats.megatron_checkpoint import find_checkpoint

    fake_checkpoint(tmp_path, 10)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(
        CheckpointFormatError,
        match=r"latest_checkpointed_iteration.txt: is empty; pass --iteration N "
        r"for one of \['iter_0000010'\]",
    ):
        find_checkpoint(tmp_path)
    assert find_checkpoint(tmp_path, 10) == tmp_path / "iter_0000010"


# -- one run per folder --------------------------------------------------------------------------

HOLDER = """
import sys, time
from ellama_megatron.launch.run_lock import take_run_lock
fd = take_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_launch_on_a_run_folder_is_refused_naming_the_first(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
        assert proc.returncode == 2
        assert f"{run_dir / LOCK_FILE}: run folder {run_dir} is in use by another launch" in proc.stderr
        assert f"pid={holder.pid}" in proc.stderr and "host=" in proc.stderr and "start=" in proc.stderr
        assert not (run_dir / "config.yaml").exists(), "the refused launch must not write the config the ranks read"
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the next launch goes ahead.
    proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "config.yaml").exists()
    assert f"pid={holder.pid}" not in (run_dir / LOCK_FILE).read_text()


# -- Megatron's exits 16 and 17, the events log, and what the config asks of Megatron -----------

REJECTED_LINE = (
    "ts=2026-12-02 06:49:06.1 node=gpu-017 device=3 jobID=4242 rank=5 iteration=3 "
    "status=RerunValidationStatus.FIRST_RERUN_REPRODUCIBLE result=1594.04 "
    "message='found NaN in local forward loss calculation'\n"
)


def test_exit_16_and_17_are_reported_from_megatrons_rejection_log(tmp_path):
    from ellama_megatron.run.events import RESULT_REJECTED_FILE, exit_report

    (tmp_path / RESULT_REJECTED_FILE).write_text(REJECTED_LINE)
    report = exit_report(tmp_path, 16)
    assert report == {
        "kind": "rejected_result",
        "rejection": "rerun_elsewhere",
        "exit_code": 16,
        "iteration": 3,
        "node": "gpu-017",
        "rank": 5,
        "check": "found NaN in local forward loss calculation",
        "result": "1594.04",
        "status": "FIRST_RERUN_REPRODUCIBLE",
    }
    assert exit_report(tmp_path, 17)["rejection"] == "result_rejected"
    assert exit_report(tmp_path, 1) is None


def slurm_env(tmp_path, restart=0):
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "t",
        "SLURM_RESTART_COUNT": str(restart),
        "ELLAMA_LOG_ROOT": str(tmp_path / "logs"),
        "PATH": str(tmp_path / "bin"),
    }


def fake_scontrol(tmp_path) -> Path:
    """scontrol that records its arguments (the requeue and the exclusion are what we check)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return calls


def test_slurm_requeues_exit_16_without_the_node_and_stops_on_17(domain_data, tmp_path, monkeypatch):
    from conftest import composed

    from ellama_megatron.launch import slurm
    from ellama_megatron.launch.prepare import prepare
    from ellama_megatron.run.events import RANK_EXIT_FILE, RESULT_REJECTED_FILE, read_events

    run_dir = tmp_path / "run"
    config = prepare(composed(*data_overrides(domain_data), f"run_dir={run_dir}"))
    (run_dir / RESULT_REJECTED_FILE).write_text(REJECTED_LINE)
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")  # never the machine's real scontrol
    env = slurm_env(tmp_path)
    # srun may report the killed steps' status: rank 0's record says 16.
    (run_dir / RANK_EXIT_FILE).write_text('{"exit_code": 16}')
    assert slurm.end_job(config, "", 137, 0, tmp_path, env) == 0
    # Slurm sets an exclusion only on a pending job: requeue first.
    assert calls.read_text().splitlines() == ["requeue 4242", "update JobId=4242 ExcNodeList=gpu-017"]
    (event,) = read_events(run_dir)
    assert (event["rejection"], event["iteration"], event["node"], event["excluded"]) == (
        "rerun_elsewhere",
        3,
        "gpu-017",
        True,
    )
    assert event["action"] == "requeue excluding the node" and not (run_dir / RANK_EXIT_FILE).exists()
    # Capped: after ELLAMA_MAX_RERUNS_ELSEWHERE exit-16 requeues the job stops with 16.
    assert slurm.end_job(config, "", 16, 0, tmp_path, {**env, "ELLAMA_MAX_RERUNS_ELSEWHERE": "1"}) == 16
    assert read_events(run_dir)[-1]["action"].startswith("stop: exit 16 again after 1 reruns")
    # 17: stop, no requeue, reported.
    calls.unlink()
    assert slurm.end_job(config, "", 17, 0, tmp_path, env) == 17
    assert not calls.exists()
    assert read_events(run_dir)[-1]["rejection"] == "result_rejected"


def test_resilience_config_becomes_megatron_flags_and_bad_values_are_refused(domain_data, tmp_path):
    from conftest import PAPER_70B, composed

    from ellama_megatron.engine.megatron_args import checkpoint_args, resilience_args
    from ellama_megatron.launch.prepare import prepare
    from ellama_megatron.run.plan import RunPlan
    from ellama_megatron.run.schema import ConfigError

    cfg = composed(*data_overrides(domain_data), f"run_dir={tmp_path}", "resilience.iterations_to_skip=[7,8]")
    args = [str(a) for a in resilience_args(cfg)]
    assert args[:2] == ["--rerun-mode", "validate_results"] and "--check-for-spiky-loss" in args
    assert args[args.index("--iterations-to-skip") + 1 :][:2] == ["7", "8"]
    assert "--no-check-for-nan-in-loss-and-grad" not in args
    off = composed(*data_overrides(domain_data), "resilience.check_nan=false", "resilience.spike_factor=null")
    assert "--no-check-for-nan-in-loss-and-grad" in resilience_args(off)
    assert "--check-for-spiky-loss" not in resilience_args(off)
    # Async save is really on: Megatron 0.19 drops --async-save without its persistent worker.
    gpu = composed(*PAPER_70B, "checkpoint.async_save=true")
    assert checkpoint_args(gpu, RunPlan.from_cfg(gpu))[-2:] == ["--async-save", "--use-persistent-ckpt-worker"]
    with pytest.raises(ConfigError) as err:
        prepare(
            composed(
                *data_overrides(domain_data),
                f"run_dir={tmp_path / 'r'}",
                "checkpoint.async_save=true",
                "resilience.spike_policy=restart",
                "resilience.spike_factor=0.5",
            )
        )
    message = str(err.value)
    assert "checkpoint.async_save=true needs cluster.accelerator=gpu" in message
    assert "resilience.spike_policy='restart'" in message and "resilience.spike_factor=0.5" in message


CHAIN = """
import subprocess, sys, time
from ellama_megatron.runtime.parent_death import die_with_parent
if sys.argv[1] == "child":
    assert die_with_parent()
    print("armed", flush=True)
    time.sleep(120)
else:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[2]])
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_process_that_dies_with_its_parent_is_gone_after_the_parents_kill_9():
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", CHAIN, "parent", CHAIN], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "armed"
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert not alive, "the child outlived its parent's kill -9"


FORKING = """
import multiprocessing, os, sys, time
from ellama_megatron.runtime.parent_death import forked_children_die_with_parent
with forked_children_die_with_parent("test-helper"):
    inside = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    inside.start()
outside = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
outside.start()
print(inside.pid, outside.pid, flush=True)
time.sleep(120)
"""


def test_children_forked_inside_the_block_are_named_and_die_with_their_parent():
    """What the ranks' forked checkpoint helpers rely on (engine/train.py): the kernel clears the
    parent-death signal of a forked child; the block arms it again, and names the child."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", FORKING], stdout=subprocess.PIPE, text=True)
    inside, outside = (psutil.Process(int(pid)) for pid in parent.stdout.readline().split())
    try:
        # The child names itself (after arming the signal) once it first runs, which on a loaded
        # machine can be after the parent has printed its pid.
        deadline = time.monotonic() + 10
        while inside.name() != "test-helper" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert inside.name() == "test-helper" and outside.name() != "test-helper"
        parent.kill()
        parent.wait()
        gone, alive = psutil.wait_procs([inside], timeout=10)
        assert not alive, "the child forked inside the block outlived its parent's kill -9"
        assert outside.is_running(), "a child forked after the block is not armed"
    finally:
        outside.kill()


# -- real runs (slow): Megatron's error injection, and a killed launcher --------------------------


@pytest.mark.slow
def test_a_rejected_loss_reproduced_here_stops_with_16_and_saves_only_the_model_before_it(domain_data, tmp_path):
    """Megatron injects a reproducible rejection into the first checked loss (iteration 2): it
    saves the model of iteration 1 and exits 16; one machine has no other GPU, so the run stops."""

    run_dir = tmp_path / "run"
    proc = cpt(
        run_dir,
        domain_data,
        "resilience.error_injection_rate=1",
        "resilience.error_injection_type=correct_result",
        timeout=600,
    )
    assert proc.returncode == 16, proc.stderr[-3000:]
    assert (run_dir / LATEST_ITERATION_FILE).read_text().strip() == "1"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000001"]
    assert not (run_dir / DONE_FILE).exists()
    (event,) = rejections(run_dir)
    assert (event["rejection"], event["exit_code"], event["check"]) == (
        "rerun_elsewhere",
        16,
        "found NaN in local forward loss calculation",
    )
    assert event["iteration"] > 1 and event["node"] and event["action"].startswith("stop")
    assert "error: exit 16 (rerun_elsewhere)" in proc.stderr and "last checkpoint: iteration 1" in proc.stderr


@pytest.mark.slow
def test_a_transient_rejection_stops_with_17_and_saves_nothing_past_it(domain_data, tmp_path):

    run_dir = tmp_path / "run"
    proc = cpt(
        run_dir,
        domain_data,
        "resilience.error_injection_rate=1",
        "resilience.error_injection_type=transient_error",
        timeout=600,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("iter_*")), "nothing may be saved past the rejected step"
    (event,) = rejections(run_dir)
    assert (event["rejection"], event["exit_code"]) == ("result_rejected", 17)
    assert "error: exit 17 (result_rejected)" in proc.stderr


def _descendants(pid: int):
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["launcher", "launcher and torchrun", "one rank"])
def test_ranks_and_their_helpers_die_with_the_launcher(killed, domain_data, tmp_path):
    import signal as signals

    import psutil

    from ellama_megatron.formats.train_log import parse_train_log

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={run_dir}",
        *data_overrides(domain_data),
        *TINY_RUN,
        "train.train_tokens=409600",
        "checkpoint.save_interval=2",
    ]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while parse_train_log(log_path.read_text()).last_iteration < 3:  # past a save: helpers exist
            assert launcher.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        family = _descendants(launcher.pid)
        ranks = rank_processes(launcher.pid)
        assert len(ranks) >= 2, [p.cmdline() for p in family]
        torchrun = [p for p in family if "torch.distributed.run" in " ".join(p.cmdline())]
        if killed == "one rank":  # torchrun stops the others; the killed rank's helpers must not stay behind
            from ellama_megatron.run.events import read_events

            ranks[0].send_signal(signals.SIGKILL)
            # A node failure: the launcher relaunches; nothing of the killed launch may outlive it.
            while not any(e["kind"] == "node_failure" for e in read_events(run_dir)):
                assert launcher.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            gone, alive = psutil.wait_procs(family, timeout=30)
            assert not alive, f"alive 30 s after the kill -9 of one rank: {[(p.pid, p.cmdline()) for p in alive]}"
            family = _descendants(launcher.pid)  # the relaunch's; stopped with the launcher below
            launcher.send_signal(signals.SIGKILL)
            launcher.wait()
        else:
            launcher.send_signal(signals.SIGKILL)
            if killed == "launcher and torchrun":
                for p in torchrun:
                    p.send_signal(signals.SIGKILL)
            launcher.wait()
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"still alive 30 s after the kill -9 of {killed}: {[(p.pid, p.cmdline()) for p in alive]}"
    # The lock died with its holder: a relaunch (dry) is not refused.
    proc = cpt(run_dir, domain_data, "train.train_tokens=409600", env={"ELLAMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
