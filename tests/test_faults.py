"""Cluster faults: what ended a launch (run/faults.py), what the run does next, and the watchdog's
judgement of a hang (launch/watchdog.py), from synthetic evidence."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ellama_megatron.formats.heartbeat import Heartbeat, HeartbeatWriter, read_heartbeats
from ellama_megatron.launch.watchdog import RankView, stalled, stuck_ranks, verdict
from ellama_megatron.run.faults import (
    LaunchEnd,
    RankFailure,
    TaskFailure,
    Timeouts,
    classify,
    decide,
    hardware_lines,
    task_failures_from_srun,
    task_failures_from_torchrun,
)

RESILIENCE = SimpleNamespace(max_same_failure=3, max_failures_without_progress=6)
TIMEOUTS = Timeouts(setup_s=600, step_factor=10, step_min_s=30, step_max_s=900, save_s=300, eval_s=200)


def end(**kw) -> LaunchEnd:
    base = dict(launch="9.0", signal=None, exit_code=1, start_iteration=100, end_iteration=100, finished=False)
    return LaunchEnd(**{**base, **kw})


def crash(rank=3, node="n07", where="train.py:10", exception="RuntimeError") -> RankFailure:
    return RankFailure(rank, node, 1.0, exception, "boom", where, "Traceback ...\nRuntimeError: boom")


def test_srun_and_torchrun_failure_lines_are_read():
    srun = (
        "srun: error: n12: task 3: Killed\n"
        "srun: error: n12: tasks 0-2,4: Exited with exit code 1\n"
        "srun: error: n13: task 9: Bus error\n"
    )
    assert task_failures_from_srun(srun) == [
        TaskFailure(3, "n12", 9, None, "Killed"),
        TaskFailure(0, "n12", None, 1, "Exited with exit code 1"),
        TaskFailure(9, "n13", 7, None, "Bus error"),
    ]
    torchrun = (
        "Failures:\n[1]:\n  time      : 2026-12-06_00:01:03\n  host      : vm\n"
        "  rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 4241)\n  error_file: <N/A>\n"
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-06_00:01:02\n  host      : vm\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n"
    )
    assert task_failures_from_torchrun(torchrun) == [
        TaskFailure(1, "vm", 9, None, "exitcode -9"),  # the root cause first
        TaskFailure(0, "vm", 15, None, "exitcode -15"),
    ]
    assert hardware_lines("ok\n[rank3]: NCCL WARN NET/IB : Got completion with error 12\nNVRM: Xid 79\nfine") == [
        "[rank3]: NCCL WARN NET/IB : Got completion with error 12",
        "NVRM: Xid 79",
    ]


@pytest.mark.parametrize(
    "launch_end,kind,hardware,nodes",
    [
        (end(finished=True, exit_code=0), "finished", False, ()),
        (end(signal="USR1", exit_code=0, end_iteration=150), "time_limit", False, ()),
        (end(signal="TERM", exit_code=0, end_iteration=150), "preempted", False, ()),
        (end(exit_code=0, end_iteration=150), "time_limit", False, ()),  # Megatron's own exit_duration
        (end(exit_code=0), "suspected_bug", False, ()),  # clean exit without progress: would loop
        (end(exit_code=16), "rejected_result", False, ()),
        (end(rank_failures=[crash()]), "crash", False, ("n07",)),
        (end(task_failures=[TaskFailure(5, "n02", 9, None, "Killed")]), "node_failure", True, ("n02",)),
        (end(rank_failures=[crash()], hardware_lines=["NVRM: Xid 79"]), "node_failure", True, ("n07",)),
        (
            end(verdict={"stuck": [{"rank": 1, "node": "n04"}], "phase": "step", "summary": "x"}),
            "hang",
            False,
            ("n04",),
        ),
    ],
)
def test_each_way_a_launch_ends_has_its_class(launch_end, kind, hardware, nodes):
    fault = classify(launch_end)
    assert (fault.kind, fault.hardware, fault.nodes) == (kind, hardware, nodes)


def test_a_killed_rank_names_its_node_though_the_others_left_tracebacks():
    """A rank killed by a signal cannot write a record; the ranks it leaves waiting fail with
    tracebacks of their own (a broken connection). The kill is the cause."""
    fault = classify(end(task_failures=[TaskFailure(2, "n09", 9, None, "Killed")], rank_failures=[crash(0, "n01")]))
    assert (fault.kind, fault.nodes, fault.ranks, fault.signature) == ("node_failure", ("n09",), (2,), "SIGKILL")


def test_failures_requeue_while_the_run_progresses_and_a_repeated_one_stops_as_a_suspected_bug():
    fault = classify(end(rank_failures=[crash()]))
    first = decide(fault, end(), [], RESILIENCE)
    assert first.go_on and first.kind == "crash" and first.exclude == ()
    history = [{"kind": "crash", "end_iteration": 100, "signature": fault.signature, "nodes": ["n07"]}]
    second = decide(fault, end(), history, RESILIENCE)
    assert second.go_on and second.exclude == ("n07",)  # the second failure on that node: it goes
    third = decide(fault, end(), history * 2, RESILIENCE)
    assert not third.go_on and third.kind == "suspected_bug" and third.exit_code == 1
    assert "the same failure (RuntimeError at train.py:10) 3 times in a row at checkpoint iteration 100" in third.reason
    # After progress (a newer checkpoint), the same failure is not "in a row".
    assert decide(fault, end(end_iteration=120), history * 2, RESILIENCE).go_on
    # Another failure at the same checkpoint breaks the streak, but failures without progress are capped.
    other = {"kind": "hang", "end_iteration": 100, "signature": "hang in step", "nodes": []}
    assert decide(fault, end(), [*history, other, *history], RESILIENCE).go_on
    capped = decide(fault, end(), [other] * 5, RESILIENCE)
    assert not capped.go_on and "6 failures without a newer checkpoint" in capped.reason


def test_hardware_looking_failures_exclude_their_node_at_once():
    fault = classify(end(task_failures=[TaskFailure(5, "n02", 9, None, "Killed")]))
    decision = decide(fault, end(), [], RESILIENCE)
    assert decision.go_on and decision.exclude == ("n02",)
    assert decide(fault, end(), [], RESILIENCE, excluded=["n02"]).exclude == ()


def beat(rank, seq, t, phase="step", stage="compute", median=1.0, iteration=12, node="n0") -> Heartbeat:
    return Heartbeat(rank, rank, 1000 + rank, node, seq, phase, iteration, t, stage, median)


def test_timeouts_follow_the_phase_and_the_median_step():
    assert TIMEOUTS.of(beat(0, 5, 0, median=1.0)) == 30  # 10 x 1 s, raised to the minimum
    assert TIMEOUTS.of(beat(0, 5, 0, median=20.0)) == 200
    assert TIMEOUTS.of(beat(0, 5, 0, median=500.0)) == 900  # capped
    assert TIMEOUTS.of(beat(0, 5, 0, median=None)) == 600  # no median yet: the set-up timeout
    assert TIMEOUTS.of(beat(0, 5, 0, phase="save", stage=None)) == 300
    assert TIMEOUTS.of(beat(0, 5, 0, phase="done", stage=None)) == float("inf")


def test_the_rank_the_others_wait_for_is_named():
    """Rank 2 froze in the compute of step 12; the others reached the gradient reduction (one beat
    further) and wait there: everyone is past the timeout, rank 2 is behind."""
    views = [
        RankView(r, f"n{r // 2}", beat(r, 41 if r == 2 else 42, 100.0, node=f"n{r // 2}"), "sleeping") for r in range(4)
    ]
    late = stalled(views, now=150.0, timeouts=TIMEOUTS, watch_start=0.0)
    assert [v.rank for v, _ in late] == [0, 1, 2, 3]
    found = verdict(views, late, 150.0, "9.0")
    assert [(s["rank"], s["node"]) for s in found["stuck"]] == [(2, "n1")]
    assert found["phase"] == "step" and found["iteration"] == 12
    assert "rank 2 on n1; 3 other rank(s) waiting" in found["summary"]
    # A stopped process is named for sure, wherever the sequence numbers are.
    views[3] = RankView(3, "n1", beat(3, 42, 100.0), "stopped")
    assert [v.rank for v in stuck_ranks(views)] == [3]
    # Nobody is late within the timeout; a rank that never beat is late after the set-up timeout.
    assert stalled(views, now=120.0, timeouts=TIMEOUTS, watch_start=0.0) == []
    silent = [RankView(0, "n0", None, "sleeping")]
    assert stalled(silent, now=500.0, timeouts=TIMEOUTS, watch_start=0.0) == []
    assert [v.rank for v, _ in stalled(silent, now=700.0, timeouts=TIMEOUTS, watch_start=0.0)] == [0]


def test_heartbeats_are_written_whole_and_read_back(tmp_path):
    writer = HeartbeatWriter(tmp_path, rank=7, local_rank=3, node="n3")
    writer.beat("setup", 0)
    record = writer.beat("step", 5, "reduce", 0.25)
    (tmp_path / "rank00008.json").write_text("{not json")  # a reader never fails on another file
    assert read_heartbeats(tmp_path) == {7: record}
    assert (record.seq, record.phase, record.stage, record.median_step_s) == (2, "step", "reduce", 0.25)


def test_fewer_nodes_keep_the_global_batch_where_the_layout_divides():
    """The paper's 70B layout (TP 8 x PP 4 = 32 GPUs a replica, global batch 1440) on 60 nodes of 8:
    with 57 usable the most that divides is 48 (DP 12, 120 micro-batches a step); none from 41 to 47."""
    from conftest import PAPER_70B, composed

    from ellama_megatron.run.plan import RunPlan

    plan = RunPlan.from_cfg(composed(*PAPER_70B))
    assert (plan.nodes, plan.dp, plan.grad_accumulation) == (60, 15, 96)
    assert plan.fewest_nodes_below(57, 30) == 48
    assert (plan.on_nodes(48).dp, plan.on_nodes(48).grad_accumulation) == (12, 120)
    assert plan.fewest_nodes_below(47, 41) is None
    assert plan.fewest_nodes_below(61, 30) == 60  # never more than the run's own


def fake_slurm(tmp_path, partition: str) -> Path:
    """scontrol (records its calls, says the job's partition) and sinfo (the partition's nodes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n[ "$2" = show ] && echo "JobId=42 Partition=p NumNodes=4"\nexit 0\n'
    )
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '{partition}'\n")
    for tool in ("scontrol", "sinfo"):
        (bin_dir / tool).chmod(0o755)
    return calls


@pytest.mark.parametrize("min_nodes,expected", [(None, None), (2, "NumNodes=2 NumTasks=2")])
def test_a_node_lost_with_the_partition_short_waits_or_goes_on_with_fewer_nodes(
    domain_data, tmp_path, monkeypatch, min_nodes, expected
):
    """Four nodes, one down; a rank on n2 is killed: n2 is excluded, two nodes are left for a job of
    four. It waits (said in the event), or under resilience.min_nodes goes on with two, same global batch."""
    import os

    from conftest import composed, data_overrides

    from ellama_megatron.launch import slurm
    from ellama_megatron.launch.prepare import prepare
    from ellama_megatron.run.events import read_events

    overrides = ["cluster.nodes=4", "cluster.procs_per_node=1", f"run_dir={tmp_path / 'run'}"]
    if min_nodes:
        overrides.append(f"resilience.min_nodes={min_nodes}")
    config = prepare(composed(*data_overrides(domain_data), *overrides))
    calls = fake_slurm(tmp_path, "n1 idle\\nn2 alloc\\nn3 alloc\\nn4 down\\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ranks.restart0.err").write_text("srun: error: n2: task 1: Killed\n")
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "1", "PATH": os.environ["PATH"]}
    assert slurm.end_job(config, "", 137, 0, tmp_path / "logs", env) == 0
    (event,) = read_events(tmp_path / "run")
    made = calls.read_text().splitlines()
    assert "requeue 42" in made
    if expected is None:
        # Excluding n2 would leave three nodes for a job of four, for good: not excluded; n4 is down, so it waits.
        assert (event["kind"], event["nodes"], event["exclude"]) == ("node_failure", ["n2"], [])
        assert (
            "node(s) n2 not excluded: the partition would keep fewer than the 4 node(s) the job needs"
            in (event["action"])
        )
        assert "the job waits for its 4 node(s): 3 usable outside its exclusions" in event["action"]
        assert not any("NumNodes" in c or "ExcNodeList" in c for c in made)
    else:
        assert (event["kind"], event["nodes"], event["exclude"]) == ("node_failure", ["n2"], ["n2"])
        assert "update JobId=42 ExcNodeList=n2" in made and f"update JobId=42 {expected}" in made
        assert (
            "requeued on 2 of 4 node(s) (resilience.min_nodes=2): DP 4 -> 2, gradient accumulation 1 -> 2"
            in (event["action"])
        )
