"""Cluster faults on one machine, with real processes (recipes/cpt.py, torchrun, two gloo ranks): a
frozen rank (SIGSTOP) is caught by the watchdog, named, its stacks dumped, and the run goes on; a
killed rank is a node failure and the run goes on; the same crash three times stops as a suspected
bug with the traceback. Each run that goes on ends with the uninterrupted run's losses."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, data_overrides

from ellama_megatron.formats.heartbeat import read_heartbeats
from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.run.events import read_events
from ellama_megatron.run.progress import saved_iteration

# Small timeouts for a tiny run (steps of about 0.1-0.5 s on a loaded 2-core machine).
WATCHDOG = [
    "resilience.hang_poll_s=1",
    "resilience.hang_step_min_s=10",
    "resilience.hang_setup_s=180",
    "resilience.hang_save_s=120",
    "resilience.hang_eval_s=120",
    "train.train_tokens=40960",  # 40 iterations of train=tiny
]
ITERS = 40  # checkpoints every 10 (TINY_RUN)


def launch(run_dir: Path, data, log: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "recipes" / "cpt.py"), f"run_dir={run_dir}", *data_overrides(data)]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, *TINY_RUN, *WATCHDOG, *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def heartbeats(launcher: subprocess.Popen) -> dict:
    """The current launch's heartbeats (launch/torchrun.py names the folder after the launcher's pid)."""
    folders = glob.glob(f"/dev/shm/ellama-heartbeats-{os.getuid()}-local-*-{launcher.pid}")
    return read_heartbeats(sorted(folders)[-1]) if folders else {}


def wait_for(condition, launcher: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert launcher.poll() is None, f"the launch ended early:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise TimeoutError(f"{log}:\n{log.read_text()[-3000:]}")


def rank_in_step(launcher, rank: int, after: int, run_dir: Path):
    """Rank ``rank``'s heartbeat once it is computing a step past ``after`` with a checkpoint saved."""

    def ready():
        beat = heartbeats(launcher).get(rank)
        ok = beat and beat.phase == "step" and beat.iteration > after and saved_iteration(run_dir) >= 10
        return beat if ok else None

    return ready


@pytest.fixture(scope="module")
def uninterrupted(domain_data, tmp_path_factory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    launcher = launch(tmp / "run", domain_data, tmp / "run.log")
    assert launcher.wait(timeout=600) == 0, (tmp / "run.log").read_text()[-3000:]
    events = read_events(tmp / "run")
    assert [e["kind"] for e in events] == ["launch", "finished"]  # the watchdog never fired
    return parse_train_log((tmp / "run.log").read_text()).train_loss


@pytest.mark.slow
def test_a_frozen_rank_and_a_killed_rank_are_recovered_without_a_person(domain_data, uninterrupted, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    launcher = launch(run_dir, domain_data, log)
    # 1. Freeze rank 1 mid-step, after the checkpoint of iteration 10: a hang.
    frozen = wait_for(rank_in_step(launcher, 1, 11, run_dir), launcher, log)
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.time()
    # 2. The watchdog ends the launch and the launcher starts another; kill one of its ranks.
    wait_for(lambda: [e for e in read_events(run_dir) if e["kind"] == "hang"], launcher, log, timeout=120)
    victim = wait_for(rank_in_step(launcher, 0, 12, run_dir), launcher, log)
    os.kill(victim.pid, signal.SIGKILL)
    assert launcher.wait(timeout=600) == 0, log.read_text()[-3000:]

    events = read_events(run_dir)
    assert [e["kind"] for e in events] == ["launch", "hang", "launch", "node_failure", "launch", "finished"]
    hang, killed = events[1], events[3]
    host = os.uname().nodename
    # The hang: the frozen rank named, with its node and state, before any collective timed out.
    stuck = hang["verdict"]["stuck"]
    assert [(s["rank"], s["node"], s["state"]) for s in stuck] == [(1, host, "stopped")]
    assert hang["ranks"] == [1] and hang["nodes"] == [host] and hang["action"].startswith("relaunch")
    detected = hang["verdict"]["time"] - stopped_at
    print(f"hang detected {detected:.1f} s after the SIGSTOP (step timeout {hang['verdict']['timeout_s']} s)")
    assert detected < 10 + 2 * 1 + 15  # the step timeout, two polls, a loaded machine's slack
    assert detected < 60 * 8  # far before the collective timeout (ceil(180 / 60) + 5 minutes)
    stacks = Path(hang["verdict"]["stacks"])
    frozen_stack = (stacks / "rank00001.py-spy.txt").read_text()
    assert "Thread" in frozen_stack and "megatron" in frozen_stack  # py-spy reads a stopped process
    waiting_stack = (stacks / "rank00000.faulthandler.txt").read_text()
    assert "Current thread" in waiting_stack or "Thread 0x" in waiting_stack
    trace = stacks / "flight_recorder" / "fr_trace_0"
    assert trace.exists() and trace.stat().st_size > 0  # the flight recorder's collectives of the waiting rank
    # ... and where it waits for the frozen one: a collective it entered and never finished.
    assert any("all_reduce" in w for w in hang["verdict"]["waiting_in"]["0"]), hang["verdict"]
    # The killed rank: a node failure (SIGKILL), relaunched; one machine, so nothing excluded.
    assert (killed["signature"], killed["ranks"], killed["nodes"], killed["exclude"]) == ("SIGKILL", [0], [host], [])
    # The run's last launch resumed from a checkpoint and reproduced the uninterrupted losses.
    resumed = events[4]["start_iteration"]
    last = parse_train_log(log.read_text())  # per iteration, the last launch's loss
    for it in range(resumed + 3, ITERS + 1):  # a launch's first two printed losses share an accumulator (Megatron)
        assert last.train_loss[it] == pytest.approx(uninterrupted[it], rel=1e-6), it


@pytest.mark.slow
def test_the_same_crash_three_times_stops_as_a_suspected_bug_with_the_traceback(domain_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    launcher = launch(run_dir, domain_data, log, "resilience.inject_crash_at=12")
    assert launcher.wait(timeout=900) == 1, log.read_text()[-3000:]
    events = read_events(run_dir)
    kinds = [e["kind"] for e in events]
    # The first launch saved iteration 10 before it crashed at 12; from there, the same crash three times.
    assert kinds == ["launch", "crash", "launch", "crash", "launch", "suspected_bug"]
    bug = events[-1]
    assert bug["end_iteration"] == 10 and bug["ranks"] == [1]
    assert "the same failure (RuntimeError at " in bug["action"] and "3 times in a row" in bug["action"]
    assert "injected crash at iteration 12" in bug["traceback"]
    text = log.read_text()
    assert "suspected bug or bad data" in text and "RuntimeError: injected crash at iteration 12" in text


@pytest.mark.slow
def test_a_run_resumes_on_half_its_ranks_with_the_same_global_batch(domain_data, tmp_path):
    """Two ranks (DP 2) to iteration 10, then one (DP 1, twice the gradient accumulation) to 20: the
    same samples make each global batch, so the losses are the uninterrupted two-rank run's. The
    optimizer state is saved fully reshardable (Megatron 0.19.2's --dist-ckpt-optim-fully-reshardable),
    which is what lets the distributed optimizer load at another DP."""
    from conftest import run_cpt

    _, reference = run_cpt(tmp_path / "ref", domain_data)
    run_dir = tmp_path / "run"
    first, _ = run_cpt(run_dir, domain_data, "train.exit_interval=10")
    assert first.returncode == 0 and saved_iteration(run_dir) == 10, first.stderr[-3000:]
    second, resumed = run_cpt(run_dir, domain_data, "cluster.procs_per_node=1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "world size 1 = TP 1 x PP 1 x CP 1 x DP 1" in second.stdout and "gradient accumulation 4" in second.stdout
    for it in range(13, 21):  # a launch's first two printed losses share an accumulator (Megatron)
        assert resumed.train_loss[it] == pytest.approx(reference.train_loss[it], rel=1e-5, abs=1e-6), it
    # Where the layout does not divide, the relaunch is refused before anything starts.
    refused, _ = run_cpt(run_dir, domain_data, "cluster.procs_per_node=3", "train.train_tokens=40960")
    assert refused.returncode == 2 and "not divisible by micro_batch_size x DP" in refused.stderr
