"""The run report (run/report.py, tools/run_report.py): every second of every launch accounted for,
goodput, time lost per fault class, time to recover. Fast: synthetic runs whose numbers are worked
out by hand below. Slow: a real run on this machine with a killed rank, whose productive time is
checked against Megatron's own iteration times in its log."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO

from ellama_megatron.formats.timeline import TimelineWriter
from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.run.events import EVENTS_FILE, read_events
from ellama_megatron.run.report import (
    EVALUATION,
    EVENT_TIME_FORMAT,
    LOST,
    PRODUCTIVE,
    SAVING,
    STARTUP,
    TEARDOWN,
    UNPLANNED,
    build_report,
    markdown,
)

T0 = 1_800_000_000  # whole seconds: event times have second resolution
PY = sys.executable


def stamp(x: float) -> str:
    return datetime.fromtimestamp(T0 + x).astimezone().strftime(EVENT_TIME_FORMAT)


def write_launch(
    run_dir: Path, launch: str, at: float, start_iteration: int, timeline: list, end=None, precise=False, **extra
):
    """One launch: its launch event at ``at``, rank 0's timeline (event, iteration, t) and its end
    event ``end`` = (kind, t, end_iteration, extra fields) or None (its launcher was killed).
    ``precise``: the launch event has its unix time ``t`` (run/events.py), else only whole seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        {"time": stamp(math.floor(at)), "kind": "launch", "iteration": start_iteration, "node": "n1", "action": "start"}
        | ({"t": T0 + at} if precise else {})
        | {"launch": launch, "start_iteration": start_iteration, "nodes": ["n1"], "ranks": 2, **extra}
    ]
    if end is not None:
        kind, t, end_iteration, extra = end
        lines.append(
            {"time": stamp(t), "kind": kind, "iteration": end_iteration, "node": "n1", "action": f"{kind} action"}
            | {"launch": launch, "start_iteration": start_iteration, "end_iteration": end_iteration, **extra}
        )
    if timeline:
        writer = TimelineWriter(run_dir, launch)
        for event, iteration, t in timeline:
            writer.write(event, iteration, t=T0 + t)
    with open(run_dir / EVENTS_FILE, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def steps(first: int, last: int, t: float, every: float = 1.0) -> list:
    return [("step", k, t + (k - first) * every) for k in range(first, last + 1)]


@pytest.fixture
def slurm_run(tmp_path) -> tuple[Path, Path]:
    """Five launches of Slurm job 100 (launch ids <job>.<restart>): a crash, a hang, a rollback, a
    time limit, then the end. The job log shows restart 0's and restart 3's batch scripts starting
    5 s and 2 s before their launch events; restarts 1, 2 and 4 have no line (no batch start known:
    their launch event is their start).

    Seconds from T0, per launch (allocated, and what each stretch is):
      1 (restart 0) -5..25 = 30: start-up -5..10 = 15; steps 1-5 (1 s each) kept; save of 5 at
        15..17.5 = 2.5; steps 6, 7 = 2 lost (crash, checkpoint 5); teardown 19.5..25 = 5.5
      2 (restart 1) 25..60 = 35: start-up 5; steps 6-10 = 5 kept; eval 35..36.2 = 1.2; save of 10
        36.2..37.2 = 1; steps 11, 12 = 2 lost (hang, checkpoint 10); teardown 39.2..60 = 20.8
      3 (restart 2) 60..80 = 20: start-up 4; steps 11-15 = 5, save of 15 = 1, steps 16-18 = 3, the
        rerun's save of 18 = 1.5; then a rejected result at 19 rolled back to 10 (11-19 skipped):
        all 8 steps lost to rejected_result; teardown 74.5..80 = 5.5
      (between jobs 80..88 = 8)
      4 (restart 3) 88..110 = 22: start-up 88..95 = 7 (11-19 skipped by Megatron: no step events);
        step 20 95..100 = 5, steps 21-25 = 5 kept; save of 25 = 1.5; eval = 1; teardown 107.5..110
        = 2.5 (time limit, checkpoint 25)
      (between jobs 110..130 = 20)
      5 (restart 4) 130..137 = 7: start-up 3; steps 26, 27 = 2 kept; save of 27 = 1; teardown 1
    """
    run = tmp_path / "run"
    write_launch(
        run,
        "100.0",
        0,
        0,
        [("start", 0, 2), ("train_start", 0, 10), *steps(1, 5, 11)]
        + [("save_start", 5, 15.5), ("save_end", 5, 17.5), ("step", 6, 18.5), ("step", 7, 19.5)],
        ("crash", 25, 5, {}),
        job="100",
        restart=0,
    )
    write_launch(
        run,
        "100.1",
        25,
        5,
        [("start", 0, 26), ("train_start", 5, 30), *steps(6, 10, 31)]
        + [("eval_start", 10, 35.2), ("eval_end", 10, 36.2), ("save_start", 10, 36.2), ("save_end", 10, 37.2)]
        + steps(11, 12, 38.2),
        ("hang", 60, 10, {}),
        job="100",
        restart=1,
    )
    write_launch(
        run,
        "100.2",
        60,
        10,
        [("start", 0, 61), ("train_start", 10, 64), *steps(11, 15, 65), ("save_start", 15, 69), ("save_end", 15, 70)]
        + steps(16, 18, 71)
        + [("save_start", 18, 73.5), ("save_end", 18, 74.5)],
        ("rejected_result", 80, 10, {"policy": "rollback", "resumed_from": 10, "skipped": list(range(11, 20))}),
        job="100",
        restart=2,
    )
    write_launch(
        run,
        "100.3",
        90,
        10,
        [("start", 0, 91), ("train_start", 10, 95), *steps(20, 25, 100)]
        + [("save_start", 25, 105.5), ("save_end", 25, 106.5), ("eval_start", 25, 106.5), ("eval_end", 25, 107.5)],
        ("time_limit", 110, 25, {}),
        job="100",
        restart=3,
    )
    write_launch(
        run,
        "100.4",
        130,
        25,
        [("start", 0, 131), ("train_start", 25, 133), *steps(26, 27, 134)]
        + [("save_start", 27, 135), ("save_end", 27, 136), ("done", 27, 136.5)],
        ("finished", 137, 27, {}),
        job="100",
        restart=4,
    )
    with open(run / EVENTS_FILE, "a") as f:  # not launch-bound: ignored
        f.write(json.dumps({"time": stamp(50), "kind": "straggler", "iteration": 9, "node": "n1", "action": "log"}))
        f.write("\n")
    logs = tmp_path / "slurm_logs"
    logs.mkdir()
    hms = lambda x: time.strftime("%H:%M:%S", time.localtime(T0 + x))  # noqa: E731
    (logs / "ellama-8b-100.out").write_text(
        f"[launch {hms(-5)}] job 100 restart 0: 1 nodes x 2 ranks\n iteration 1/27 | ...\n"
        f"[launch {hms(88)}] job 100 restart 3: 1 nodes x 2 ranks\n"
    )
    return run, logs


def test_every_second_of_a_slurm_run_with_four_faults_is_accounted_for(slurm_run):
    run, logs = slurm_run
    report = build_report(run, [logs])
    assert [x.id for x in report.launches] == ["100.0", "100.1", "100.2", "100.3", "100.4"]
    assert [x.start - T0 for x in report.launches] == [-5, 25, 60, 88, 130]  # restarts 0 and 3 from the job log
    assert [round(x.allocated_s, 6) for x in report.launches] == [30, 35, 20, 22, 7]
    assert report.allocated_s == pytest.approx(114)
    expected = {STARTUP: 34, PRODUCTIVE: 22, LOST: 12, SAVING: 8.5, EVALUATION: 2.2, TEARDOWN: 35.3}
    assert {c: round(report.seconds(c), 6) for c in expected} == expected
    assert sum(expected.values()) == pytest.approx(report.allocated_s)  # nothing missing, nothing twice
    assert report.final_iteration == 27
    kept = [k for x in report.launches for k in x.productive_iterations]
    assert kept == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 21, 22, 23, 24, 25, 26, 27]  # 11-19 skipped
    assert report.goodput == pytest.approx(22 / 114)
    assert [g.seconds for g in report.gaps] == [0, 0, 8, 20] and report.between_jobs_s == 28
    assert report.restarts == 4

    costs = {k: (c.launches, c.lost_work_s, c.lost_iterations, c.teardown_s, c.restart_s, c.between_jobs_s)
             for k, c in report.fault_costs().items()}  # fmt: skip
    assert costs == {
        "time_limit": (1, 0, 0, pytest.approx(2.5), 3, 20),
        "rejected_result": (1, 8, 8, pytest.approx(5.5), 7, 8),
        "hang": (1, 2, 2, pytest.approx(20.8), 4, 0),
        "crash": (1, 2, 2, pytest.approx(5.5), 5, 0),
    }
    assert report.fault_costs()["hang"].total_s == pytest.approx(2 + 20.8 + 4)
    # Recovery: from the last timeline event to the next step's end. crash 19.5 -> 31, hang 39.2 -> 65,
    # rollback 74.5 -> 100, time limit 107.5 -> 134.
    assert [(r.kind, round(r.seconds, 6)) for r in report.recoveries] == [
        ("crash", 11.5),
        ("hang", 25.8),
        ("rejected_result", 25.5),
        ("time_limit", 26.5),
    ]
    assert report.mean_time_to_recover() == pytest.approx((11.5 + 25.8 + 25.5 + 26.5) / 4)
    assert report.mean_time_to_recover(UNPLANNED) == pytest.approx((11.5 + 25.8 + 25.5) / 3)


def test_the_tool_writes_the_table_the_json_and_the_picture(slurm_run, tmp_path):
    run, logs = slurm_run
    r = subprocess.run(
        [PY, "tools/run_report.py", str(run), "--logs", str(logs)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "report"
    assert r.stdout.strip().splitlines()[-1].startswith("goodput 19.3%: 22.0 s productive of 1 min 54 s allocated")
    data = json.loads((out / "run_report.json").read_text())
    assert data["goodput"] == pytest.approx(22 / 114, abs=1e-6) and data["allocated_s"] == 114
    assert data["productive_s"] == 22 and data["restarts"] == 4 and data["between_jobs_s"] == 28
    assert data["lost_by_class"]["hang"]["total_s"] == pytest.approx(26.8)
    assert data["mean_time_to_recover_unplanned_s"] == pytest.approx(20.933, abs=1e-3)
    text = (out / "run_report.md").read_text()
    assert "Goodput **19.3%**" in text and "![run timeline](run_timeline.png)" in text
    assert "| hang | 1 | 2.0 s (2) | 20.8 s | 4.0 s | 26.8 s | 23.5% | 0.0 s |" in text
    assert "| training: iterations in the final model (productive) | 22.0 | 19.3% |" in text
    assert text == markdown(build_report(run, [logs]))  # the file is the library's text
    png = (out / "run_timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_the_demo_report_shows_the_run_report_of_a_finished_run(slurm_run, tmp_path):
    """recipes/demo/report.py's section: the tool's table (headings one level down) and its picture,
    linked relative to REPORT.md; nothing for a run folder without a report."""
    sys.path.insert(0, str(REPO / "recipes"))  # the demo is no part of the library
    from demo.report import run_report_lines

    run, logs = slurm_run
    assert run_report_lines(run, tmp_path) == []
    subprocess.run([PY, "tools/run_report.py", str(run), "--logs", str(logs)], cwd=REPO, check=True)
    section = "\n".join(run_report_lines(run, tmp_path))
    assert "### Run report: run" in section and "#### Time lost per fault class" in section
    assert (
        "![run timeline](run/report/run_timeline.png)" in section
        and (tmp_path / "run/report/run_timeline.png").exists()
    )
    assert "| rejected_result | 1 | 8.0 s (8) | 5.5 s | 7.0 s | 20.5 s | 18.0% | 8.0 s |" in section


def test_a_killed_launcher_and_a_launch_without_a_timeline(tmp_path):
    """Launch 1 (0..7) has no end event of its own: counted to its last timeline event, its checkpoint
    its last save (2), step 3 lost, the wait after it unknown; a node failure event for it comes after
    launch 2's (as a launcher that died with its node would get one): its class, not its time. Launch
    2 (10..15) crashed before rank 0 wrote anything: start-up throughout. Launch 3 (20.25..26)
    finishes from checkpoint 2; its launch event has a unix time to the millisecond, which counts,
    not its whole second."""
    run = tmp_path / "run"
    write_launch(
        run,
        "a",
        0,
        0,
        [("start", 0, 1), ("train_start", 0, 3), ("step", 1, 4), ("step", 2, 5)]
        + [("save_start", 2, 5), ("save_end", 2, 6), ("step", 3, 7)],
    )
    write_launch(run, "b", 10, 2, [], ("crash", 15, 2, {}))
    late = {"time": stamp(16), "kind": "node_failure", "iteration": 2, "node": "n1", "action": "relaunch"}
    with open(run / EVENTS_FILE, "a") as f:
        f.write(json.dumps(late | {"launch": "a", "start_iteration": 0, "end_iteration": 2}) + "\n")
    write_launch(
        run,
        "c",
        20.25,
        2,
        [("start", 0, 21), ("train_start", 2, 23), ("step", 3, 24), ("save_start", 3, 24), ("save_end", 3, 25)]
        + [("done", 3, 25.5)],
        ("finished", 26, 3, {}),
        precise=True,
    )
    report = build_report(run)
    a, b, c = report.launches
    assert (a.end - T0, a.end_kind, a.end_iteration, a.allocated_s) == (7, "node_failure", 2, 7)
    assert (b.timeline, b.seconds(STARTUP), b.allocated_s) == (False, 5, 5)
    assert c.start - T0 == 20.25 and c.seconds(STARTUP) == pytest.approx(2.75)
    assert [g.seconds for g in report.gaps] == [None, pytest.approx(5.25)]
    assert report.productive_s == pytest.approx(3) and report.allocated_s == pytest.approx(17.75)
    assert report.goodput == pytest.approx(3 / 17.75)
    costs = report.fault_costs()
    assert (costs["node_failure"].lost_work_s, costs["node_failure"].restart_s) == (1, 5)
    assert (costs["crash"].teardown_s, costs["crash"].restart_s) == (0, pytest.approx(2.75))
    assert costs["crash"].between_jobs_s == pytest.approx(5.25)
    # a's last timeline event 7 -> the next step anywhere, 3 at 24; b has none: its end 15 -> 24
    assert [(r.kind, r.seconds) for r in report.recoveries] == [("node_failure", 17), ("crash", 9)]
    text = markdown(report)
    assert "1 unknown" in text and "has no end event" in text


def folder(run: Path, events: str | None = None, timeline: bool = False) -> None:
    run.mkdir()
    if events is not None:
        (run / EVENTS_FILE).write_text(events)
    if timeline:
        (run / "timeline").mkdir()
        (run / "timeline" / "x.jsonl").write_text('{"t": 1.0, "event": "start", "iteration": 0}\n')


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda d: None, ["no such folder"]),
        (folder, ["events.jsonl: not found"]),
        (lambda d: folder(d, "{}\n"), ["timeline: no launch timelines"]),
        (lambda d: folder(d, '{"kind": "straggler"}\n', True), ["events.jsonl: no launch events"]),
        (lambda d: folder(d, '{"kind": "launch", "time": "yesterday"}\n', True), ["line 1: time 'yesterday'"]),
        (lambda d: folder(d, '{"kind": "launch"\n', True), ["events.jsonl: not JSON lines"]),
    ],
)
def test_bad_run_folders_are_refused_with_the_file_and_the_fix(tmp_path, make, names):
    run = tmp_path / "run"
    make(run)
    r = subprocess.run([PY, "tools/run_report.py", str(run)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {run}") and all(n in line for n in names), line
    assert ";" in line  # what to do about it
    assert not (run / "report").exists()


# -- a real run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_productive_time_of_a_real_run_with_a_killed_rank_matches_megatrons_iteration_times(domain_data, tmp_path):
    """Kill rank 0 after the checkpoint of iteration 10 (a node failure: the iterations after it are
    lost); the relaunch finishes the 40 iterations. Megatron times each iteration itself (its
    'elapsed time per iteration', logged at every iteration by train=tiny): the iterations in the
    final model are 1-10 of the first launch and 11-40 of the second, the last time the log shows
    each. Their sum is the productive time the report must find."""
    from test_faults_local import ITERS, launch, rank_in_step, wait_for

    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    launcher = launch(run_dir, domain_data, log)
    victim = wait_for(rank_in_step(launcher, 0, 12, run_dir), launcher, log)
    os.kill(victim.pid, signal.SIGKILL)
    assert launcher.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert [e["kind"] for e in read_events(run_dir)] == ["launch", "node_failure", "launch", "finished"]

    r = subprocess.run([PY, "tools/run_report.py", str(run_dir)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip())
    data = json.loads((run_dir / "report" / "run_report.json").read_text())
    megatron = parse_train_log(log.read_text()).iteration_ms
    assert sorted(megatron) == list(range(1, ITERS + 1))
    # Megatron prints a launch's second iteration time as the mean of its first two: its own time back.
    for started in (e for e in read_events(run_dir) if e["kind"] == "launch"):
        first = started["start_iteration"] + 1
        megatron[first + 1] = 2 * megatron[first + 1] - megatron[first]
    measured = sum(megatron.values()) / 1000
    print(f"productive: report {data['productive_s']:.2f} s, Megatron's iteration times {measured:.2f} s")
    assert data["final_iteration"] == ITERS and data["productive_iterations"] == ITERS
    # The report's iteration k runs from the previous timeline event to step k's; Megatron's timer of a
    # launch's first iteration starts later, its train() preparing the loop first (25-30 ms per launch
    # on the idle 2-core VM), and the hooks add about 1 ms per iteration that its timer does not see:
    # 1.7-2.0% of this 40-iteration run idle, 3.6% in CI's two test processes (2026-12-06).
    assert data["productive_s"] == pytest.approx(measured, rel=0.05)
    first, second = data["launches"]
    assert first["end_kind"] == "node_failure" and first["lost_iterations"] >= 2  # 11 and the one it died in
    assert data["lost_by_class"]["node_failure"]["lost_iterations"] == first["lost_iterations"]
    assert second["productive_iterations"] == ITERS - first["productive_iterations"] == ITERS - 10
    assert data["allocated_s"] == pytest.approx(sum(data["seconds"].values()), abs=1e-3)
    assert [r["kind"] for r in data["recoveries"]] == ["node_failure"] and data["recoveries"][0]["seconds"] > 0
    assert (run_dir / "report" / "run_timeline.png").stat().st_size > 10_000
