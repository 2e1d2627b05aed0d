"""The run's event log, ``${run_dir}/events.jsonl``: one JSON line per thing that happened to the run
as a whole, appended by the launchers (and a straggler report by rank 0): ``time`` (local, to the
second, for people), ``t`` (the same moment as a unix time to the millisecond, for the run report's
durations: run/report.py), ``kind``, ``iteration``, ``node``, ``action``, and what else explains it.

- ``kind: launch`` when a launch starts: ``launch`` (its id: ``<job>.<restart>`` on Slurm,
  ``local-<time>-<pid>`` for recipes/cpt.py), ``start_iteration`` (the checkpoint it resumes from),
  ``nodes``, ``ranks``, ``job``, ``restart``.
- One event when it ends, whose kind is its class (run/faults.py: finished, preempted, time_limit,
  rejected_result, hang, node_failure, crash, suspected_bug): ``launch``, ``start_iteration``,
  ``iteration`` (the newest complete checkpoint now), ``nodes``/``ranks`` it points at,
  ``signature`` (what makes two failures the same), ``action`` (requeue/relaunch and why, or stop and
  why), ``exclude`` (nodes taken out of the job), and for a hang the watchdog's ``verdict``, for a
  crash or suspected bug the failing rank's ``traceback``. A rejected result (Megatron's exit 16/17)
  carries ``rejection``, ``exit_code``, ``rank``, ``check``, ``result``, ``status`` and, after a skip or
  rollback, ``policy``, ``resumed_from``, ``skipped``, ``deleted`` (run/recovery.py).
- ``kind: straggler``: a rank slower than logging.straggler_factor x the median for
  logging.straggler_intervals log intervals (engine/stragglers.py).

What Megatron's rerun state machine rejected is read from its own log, ``result_rejected.txt``
(the engine points --result-rejected-tracker-filename there)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"  # in run_dir
EVENT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # an event's ``time``
RESULT_REJECTED_FILE = "result_rejected.txt"  # in run_dir: Megatron's log of rejected results, one line each
RANK_EXIT_FILE = "rank_exit.json"  # in run_dir: rank 0's exit 16/17 (torchrun reports every failure as 1)

# Megatron's exit codes from the rerun state machine (megatron.core.rerun_state_machine).
EXIT_RERUN_ELSEWHERE = 16  # EXIT_CODE_RESUME_TO_DISAMBIGUATE: a rejected result reproduced here; rerun on another GPU
EXIT_RESULT_REJECTED = 17  # EXIT_CODE_FAILED_ON_RESULT_VALIDATION: the result was diagnosed; the run must stop

_REJECTED = re.compile(
    r"ts=(?P<ts>.+?) node=(?P<node>\S+) device=(?P<device>\S+) jobID=(?P<job>\S+) rank=(?P<rank>\d+) "
    r"iteration=(?P<iteration>\d+) status=(?P<status>\S+) result=(?P<result>.+?) message='(?P<message>.*)'"
)


def append_event(
    run_dir: str | Path, kind: str, *, iteration: int | None, node: str | None, action: str, **detail
) -> dict:
    """Append one event to the run's log and return it."""
    now = time.time()
    event = {
        "time": time.strftime(EVENT_TIME_FORMAT, time.localtime(now)),
        "t": round(now, 3),
        "kind": kind,
        "iteration": iteration,
        "node": node,
        "action": action,
        **detail,
    }
    with open(Path(run_dir) / EVENTS_FILE, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(event) + "\n")
    return event


def read_events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_rejection(run_dir: str | Path) -> dict | None:
    """The last result Megatron rejected in this run (node, rank, iteration, status, result, message), or None."""
    path = Path(run_dir) / RESULT_REJECTED_FILE
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        match = _REJECTED.search(line)
        if match:
            found = match.groupdict()
            found["iteration"], found["rank"] = int(found["iteration"]), int(found["rank"])
            found["status"] = found["status"].split(".")[-1]
            return found
    return None


def exit_report(run_dir: str | Path, exit_code: int) -> dict | None:
    """For Megatron's exit 16 or 17: the event (kind, iteration, node, rank, check, result) without
    its action, for the launcher to decide and append; None for any other exit."""
    if exit_code not in (EXIT_RERUN_ELSEWHERE, EXIT_RESULT_REJECTED):
        return None
    rejected = last_rejection(run_dir) or {}
    return {
        "kind": "rejected_result",  # run/faults.py's class
        "rejection": "rerun_elsewhere" if exit_code == EXIT_RERUN_ELSEWHERE else "result_rejected",
        "exit_code": exit_code,
        "iteration": rejected.get("iteration"),
        "node": rejected.get("node"),
        "rank": rejected.get("rank"),
        "check": rejected.get("message"),
        "result": rejected.get("result"),
        "status": rejected.get("status"),
    }


def take_rank_exit(run_dir: str | Path, launcher_code: int) -> int:
    """The ranks' exit status: rank 0's recorded 16 or 17 when the launcher (torchrun) failed, else
    the launcher's own. The record is consumed, so a later launch does not read it again."""
    path = Path(run_dir) / RANK_EXIT_FILE
    if not path.exists():
        return launcher_code
    recorded = json.loads(path.read_text()).get("exit_code")
    path.unlink()
    return int(recorded) if launcher_code != 0 and recorded else launcher_code


def describe(report: dict) -> str:
    """One line for a person: what was rejected, where, when."""
    return (
        f"exit {report['exit_code']} ({report['rejection']}): iteration {report['iteration']}, rank {report['rank']} "
        f"on {report['node']}: {report['check'] or 'no record in ' + RESULT_REJECTED_FILE} "
        f"(result {report['result']}, {report['status']})"
    )
