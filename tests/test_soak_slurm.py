"""The unattended month in miniature: a tiny run on the real local Slurm with an injector that, at
seeded random moments, SIGKILLs a rank, freezes one with SIGSTOP (a hang), kills a rank during a
save and preempts the job. Nobody acts: the run must finish with the uninterrupted run's losses, and
events.jsonl must classify every fault, naming the frozen rank and its node.

ELLAMA_TEST_SOAK_SEED picks the moments (0 in CI)."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_slurm import final_losses, submit

from ellama_megatron.formats.heartbeat import read_heartbeats
from ellama_megatron.formats.train_log import parse_train_log, split_by_job_start
from ellama_megatron.run.events import read_events
from ellama_megatron.run.progress import saved_iteration

SEED = int(os.environ.get("ELLAMA_TEST_SOAK_SEED", "0"))
ITERS = 40
WATCHDOG = [
    "resilience.hang_poll_s=1",
    "resilience.hang_step_min_s=10",
    "resilience.hang_setup_s=240",
    "resilience.hang_save_s=120",
    "resilience.hang_eval_s=120",
    f"train.train_tokens={ITERS * 8 * 128}",
]
FAULTS = ("kill a rank", "freeze a rank", "kill a rank in a save", "preempt the job")


def heartbeats(job: int, restart: int) -> dict:
    folders = glob.glob(f"/dev/shm/ellama-heartbeats-{os.getuid()}-{job}.{restart}")
    return read_heartbeats(folders[0]) if folders else {}


@pytest.fixture(scope="module")
def soak_reference(slurm_cluster, tiny_blend, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak_ref")
    job, out = submit(slurm_cluster, tmp, "soakref", WATCHDOG, tiny_blend)
    state = slurm_cluster.wait(job, timeout=600)
    assert state["JobState"] == "COMPLETED", out.read_text()[-3000:]
    return final_losses(out.read_text())


@pytest.mark.slurm
@pytest.mark.slow
def test_soak_every_fault_recovered_without_a_person(slurm_cluster, tiny_blend, soak_reference, tmp_path):
    rng = random.Random(SEED)
    job, out = submit(slurm_cluster, tmp_path, "soak", WATCHDOG, tiny_blend)
    run_dir = tmp_path / "soak"
    done: list[dict] = []  # what the injector did, in order
    deadline = time.monotonic() + 1200
    try:
        for fault in FAULTS:
            restart = len(done)  # one launch per fault: each ends the launch it hits
            start = None
            after = rng.randint(2, 6)  # iterations into the launch
            victim_rank = rng.randint(0, 1)
            while time.monotonic() < deadline:
                state = slurm_cluster.job(job)
                assert state.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"), out.read_text()[-3000:]
                beats = heartbeats(job, restart)
                victim = beats.get(victim_rank)
                if victim and start is None:
                    start = saved_iteration(run_dir)
                ready = victim and victim.phase == "step" and victim.iteration > (start or 0) + after
                if fault == "kill a rank in a save":
                    ready = victim and victim.phase == "save" and victim.iteration > (start or 0)
                if ready:
                    break
                time.sleep(0.05)
            else:
                raise TimeoutError(f"{fault}: the launch never got there\n{out.read_text()[-3000:]}")
            if fault == "preempt the job":
                slurm_cluster.run("scancel", "--batch", "--signal=TERM", str(job))
            else:
                os.kill(victim.pid, signal.SIGSTOP if fault == "freeze a rank" else signal.SIGKILL)
            done.append(
                {
                    "fault": fault,
                    "rank": victim.rank,
                    "iteration": victim.iteration,
                    "phase": victim.phase,
                    "t": time.time(),
                }
            )
            print(f"{fault}: rank {victim.rank} at iteration {victim.iteration} ({victim.phase})", flush=True)
            # Wait for the next launch before the next fault.
            while time.monotonic() < deadline and not heartbeats(job, restart + 1):
                time.sleep(0.2)
        state = slurm_cluster.wait(job, timeout=max(60, deadline - time.monotonic()))
    finally:
        slurm_cluster.cancel(job)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == str(len(FAULTS)), log[-3000:]

    events = read_events(run_dir)
    ends = [e for e in events if e["kind"] not in ("launch", "straggler")]
    assert [e["kind"] for e in ends] == ["node_failure", "hang", "node_failure", "preempted", "finished"]
    host = os.uname().nodename
    killed, hang, killed_in_save, preempted, _ = ends
    assert killed["signature"] == "SIGKILL" and killed["ranks"] == [done[0]["rank"]] and killed["nodes"] == [host]
    assert killed_in_save["signature"] == "SIGKILL" and killed_in_save["ranks"] == [done[2]["rank"]]
    # One node: excluding it would hold the job forever, so the exclusion is refused and said so.
    assert "not excluded: the partition would keep fewer than the 1 node(s) the job needs" in killed["action"]
    stuck = hang["verdict"]["stuck"]
    assert [(s["rank"], s["node"], s["state"]) for s in stuck] == [(done[1]["rank"], host, "stopped")]
    stacks = Path(hang["verdict"]["stacks"])
    assert (stacks / f"rank{done[1]['rank']:05d}.py-spy.txt").read_text().count("Thread") >= 1
    assert preempted["signal"] == "TERM"
    # The kill in a save: that save's checkpoint was cut short and never loaded.
    assert killed_in_save["end_iteration"] < done[2]["iteration"]
    launches = [e for e in events if e["kind"] == "launch"]
    assert [e["start_iteration"] for e in launches[1:]] == [e["end_iteration"] for e in ends[:-1]]

    # The run's losses: each launch from its third iteration on (Megatron's first two printed losses
    # share an accumulator), and the final validation, are the uninterrupted run's.
    ref_train, ref_valid = soak_reference
    segments = split_by_job_start(log)  # one per launch
    assert len(segments) == len(FAULTS) + 1
    for launch, segment in zip(launches, segments):
        train = parse_train_log(segment).train_loss
        for it in range(launch["start_iteration"] + 3, max(train, default=0) + 1):
            assert train[it] == pytest.approx(ref_train[it], rel=1e-6), (launch["launch"], it)
    _, valid = final_losses(log)
    assert valid == pytest.approx(ref_valid, rel=1e-6)
    # The run report: its productive time is Megatron's own iteration times of the iterations that
    # ended up in the final model (each launch's from the checkpoint it started at to the one it left).
    report = subprocess.run(
        [sys.executable, "tools/run_report.py", str(run_dir), "--logs", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    data = json.loads((run_dir / "report" / "run_report.json").read_text())
    measured = 0.0
    for launch, segment, end in zip(launches, segments, ends):
        ms = parse_train_log(segment).iteration_ms
        first = launch["start_iteration"] + 1
        if first in ms and first + 1 in ms:  # Megatron's second printed time is the launch's first two's mean
            ms[first + 1] = 2 * ms[first + 1] - ms[first]
        measured += sum(ms[it] for it in range(launch["start_iteration"] + 1, end["end_iteration"] + 1)) / 1000
    assert data["productive_iterations"] == ITERS
    assert data["productive_s"] == pytest.approx(measured, rel=0.02)
    assert (run_dir / "report" / "run_timeline.png").is_file()
    recoveries = [r["seconds"] for r in data["recoveries"]]
    detected = hang["verdict"]["time"] - done[1]["t"]
    print(
        f"soak: goodput {data['productive_s'] / data['allocated_s']:.1%} ({data['productive_s']:.1f} s productive, "
        f"Megatron's iteration times {measured:.1f} s); time to recover per fault {recoveries} s"
    )
    print(f"soak seed {SEED}: hang detected {detected:.1f} s after the SIGSTOP; faults {done}")
