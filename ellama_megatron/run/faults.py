"""What ended a launch, and what the run does next: the fault classes and the recovery rules shared
by the Slurm launcher (launch/slurm.py: requeue) and the local one (launch/torchrun.py: relaunch).

Every launch's end is one event in ``${run_dir}/events.jsonl`` whose ``kind`` is its class:

  finished         the token budget is spent
  preempted        the job got SIGTERM (preemption, scancel): the ranks saved on it; requeued
  time_limit       USR1 before the wall time, or Megatron's own exit_duration: saved; requeued
  rejected_result  Megatron's rerun state machine exited 16 or 17 (a NaN or spike): run/recovery.py
  hang             the watchdog saw a rank not advance within its phase's timeout: stacks dumped,
                   ranks killed
  node_failure     a rank died the way failing hardware kills it (SIGKILL, SIGBUS, NCCL, Xid, ECC,
                   a node lost), or failures repeat on one node
  crash            any other failure of the ranks: an exception, an exit code
  suspected_bug    the same failure at the same checkpoint ``resilience.max_same_failure`` times in
                   a row: stopped with the failing rank's traceback
  bad_data         a rank raised BadData (a token id outside the vocabulary, engine/token_ids.py):
                   stopped at once with its one line and exit 2, never retried

Recovery (``decide``): finished stops; preempted and time_limit requeue; hang, node_failure and crash
requeue, from the newest complete checkpoint, unless the same failure (same class, same exception
and place, or same signal, or the same phase of a hang) left the run at the same checkpoint K times
in a row (``resilience.max_same_failure``: suspected bug or bad data, stop), or
``resilience.max_failures_without_progress`` failures of any kind left it there (stop: something is
wrong that a retry does not fix). A node
is excluded from the requeued job at once when the failure looks like hardware, and otherwise when
failures repeat on it; never so many that the partition could not hold the job any more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ellama_megatron.formats.atomic import write_json_atomic
from ellama_megatron.formats.heartbeat import Heartbeat

FAULT_CLASSES = (
    "finished",
    "preempted",
    "time_limit",
    "rejected_result",
    "hang",
    "node_failure",
    "crash",
    "suspected_bug",
    "bad_data",
)
FAILURES = ("hang", "node_failure", "crash")  # the classes the retry rules count
FAILURES_DIR = "failures"  # in run_dir: failures/<launch id>/rank<N>.json, written by a failing rank
VERDICT_FILE = "hang_verdict.json"  # in run_dir/failures/<launch id>/: the watchdog's finding
HANGS_DIR = "hangs"  # in run_dir: hangs/<launch id>/, the stacks of every rank the watchdog dumped
BAD_DATA = "bad data"  # starts a bad-data stop's line after "error: ", the same from a rank and from the launcher
EXIT_BAD_DATA = 2  # a bad-data stop's exit status, a rank's and the run's: the input's fault, as a refused config


class BadData(Exception):
    """Input that no retry fixes (a token id outside the model's vocabulary), raised in a rank with a
    one-line message naming the file, the place and the fix. The rank records it as its failure
    (engine/failure_evidence.py), prints ``error: bad data: <message>`` and exits EXIT_BAD_DATA."""


# Signals that kill a process the way a failing machine does (the kernel's OOM killer and a node
# agent send SIGKILL; a bad memory page gives SIGBUS). SIGSEGV and SIGABRT are left to the repeat
# rule: they are as often a bug.
HARDWARE_SIGNALS = {9: "SIGKILL", 7: "SIGBUS"}
# Lines in the ranks' output that name failing hardware or its network.
HARDWARE_PATTERNS = re.compile(
    r"\bXid\b|uncorrectable ECC|ECC error|fallen off the bus|ncclSystemError|ncclRemoteError|"
    r"NCCL WARN NET/IB|cudaErrorECCUncorrectable|NVLink error|Bus error|DUE TO NODE FAILURE|Node failure on",
    re.IGNORECASE,
)
# srun:   "srun: error: node12: task 3: Killed", "srun: error: node12: tasks 0-7: Exited with exit code 1"
_SRUN_TASK = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): (.+)")
# torchrun's summary: "rank      : 1 (local_rank: 1)", "exitcode  : -9 (pid: 1234)", "host      : vm"
_TORCHRUN_FAILURE = re.compile(r"host\s*:\s*(\S+)\s*\n\s*rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Timeouts:
    """The watchdog's timeout per phase (launch/watchdog.py), from resilience.hang_*."""

    setup_s: float
    step_factor: float
    step_min_s: float
    step_max_s: float
    save_s: float
    eval_s: float

    @classmethod
    def from_config(cls, resilience) -> Timeouts:
        r = resilience
        return cls(
            float(r.hang_setup_s),
            float(r.hang_step_factor),
            float(r.hang_step_min_s),
            float(r.hang_step_max_s),
            float(r.hang_save_s),
            float(r.hang_eval_s),
        )

    @property
    def longest_s(self) -> float:
        return max(self.setup_s, self.step_max_s, self.save_s, self.eval_s)

    def of(self, beat: Heartbeat) -> float:
        if beat.phase == "step":
            if beat.median_step_s is None:
                return self.setup_s
            return min(max(self.step_factor * beat.median_step_s, self.step_min_s), self.step_max_s)
        return {"setup": self.setup_s, "save": self.save_s, "eval": self.eval_s}.get(beat.phase, float("inf"))


@dataclass(frozen=True)
class TaskFailure:
    """One rank's process ended badly, as the launcher (srun, torchrun) reported it."""

    rank: int | None
    node: str | None
    signal: int | None  # the signal that killed it, if one did
    exit_code: int | None
    text: str  # the launcher's words


@dataclass(frozen=True)
class RankFailure:
    """What a rank wrote about its own exception before it died (failures/<launch>/rank<N>.json)."""

    rank: int
    node: str
    time: float
    exception: str  # type name
    message: str
    where: str  # file:line of the innermost frame
    traceback: str
    iteration: int | None = None


@dataclass
class LaunchEnd:
    """Everything known about how one launch's ranks ended."""

    launch: str
    signal: str | None  # the batch shell's signal: "USR1" (time limit), "TERM" (preemption)
    exit_code: int  # the ranks' (srun's or torchrun's, Megatron's 16/17 restored)
    start_iteration: int
    end_iteration: int  # the newest complete checkpoint now
    finished: bool
    task_failures: list[TaskFailure] = field(default_factory=list)
    rank_failures: list[RankFailure] = field(default_factory=list)  # earliest first
    hardware_lines: list[str] = field(default_factory=list)  # output lines matching HARDWARE_PATTERNS
    verdict: dict | None = None  # the watchdog's hang verdict for this launch


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_CLASSES
    signature: str  # what makes two failures "the same": class and the place or signal
    nodes: tuple[str, ...] = ()  # the nodes it points at
    ranks: tuple[int, ...] = ()
    hardware: bool = False  # looks like the machine's fault: its node is excluded at once
    detail: str = ""
    traceback: str | None = None


def task_failures_from_srun(text: str) -> list[TaskFailure]:
    out = []
    for node, tasks, what in _SRUN_TASK.findall(text):
        first = int(re.split(r"[,\-]", tasks)[0])
        signal = 9 if what.strip().startswith("Killed") else None
        bus = "Bus error" in what
        code = re.search(r"exit code (\d+)", what)
        out.append(TaskFailure(first, node, 7 if bus else signal, int(code.group(1)) if code else None, what.strip()))
    return out


def task_failures_from_torchrun(text: str) -> list[TaskFailure]:
    """torchrun's failure summary, its root cause (the first rank to fail) first: the ranks it lists
    under "Failures" are mostly those it stopped itself afterwards (SIGTERM)."""
    summary = text[text.rfind("Failures:") :] if "Failures:" in text else text
    head, _, root = summary.partition("Root Cause (first observed failure):")
    out = []
    for node, rank, code in _TORCHRUN_FAILURE.findall(root) + _TORCHRUN_FAILURE.findall(head):
        code = int(code)
        out.append(
            TaskFailure(int(rank), node, -code if code < 0 else None, code if code >= 0 else None, f"exitcode {code}")
        )
    return out


def hardware_lines(text: str, limit: int = 5) -> list[str]:
    return [line.strip()[:300] for line in text.splitlines() if HARDWARE_PATTERNS.search(line)][:limit]


def failures_dir(run_dir: str | Path, launch: str) -> Path:
    return Path(run_dir) / FAILURES_DIR / launch


def write_rank_failure(run_dir: str | Path, launch: str, failure: RankFailure) -> Path:
    path = failures_dir(run_dir, launch) / f"rank{failure.rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(failure))
    return path


def read_rank_failures(run_dir: str | Path, launch: str) -> list[RankFailure]:
    """The launch's rank failure records, earliest first (the first is the cause; the others
    mostly died of it: a collective timing out, a broken connection)."""
    out = []
    for path in sorted(failures_dir(run_dir, launch).glob("rank*.json")):
        try:
            out.append(RankFailure(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda f: f.time)


def read_verdict(run_dir: str | Path, launch: str) -> dict | None:
    path = failures_dir(run_dir, launch) / VERDICT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def classify(end: LaunchEnd) -> Fault:
    """The launch's fault class and what it points at (rules in the module docstring)."""
    if end.finished:
        return Fault("finished", "finished")
    bad = next((f for f in end.rank_failures if f.exception == BadData.__name__), None)
    if bad is not None:  # the cause whatever else failed after it (its peers, blocked in a collective)
        return Fault("bad_data", BAD_DATA, nodes=(bad.node,), ranks=(bad.rank,), detail=bad.message)
    if end.verdict:
        stuck = end.verdict.get("stuck") or []
        phase = end.verdict.get("phase", "?")
        return Fault(
            "hang",
            f"hang in {phase}",
            nodes=tuple(sorted({s["node"] for s in stuck})),
            ranks=tuple(sorted(s["rank"] for s in stuck)),
            detail=end.verdict.get("summary", ""),
        )
    if end.exit_code in (16, 17):
        return Fault("rejected_result", f"exit {end.exit_code}")
    if end.signal == "USR1":
        return Fault("time_limit", "time_limit")
    if end.signal:
        return Fault("preempted", f"SIG{end.signal}")
    if end.exit_code == 0:
        if end.end_iteration > end.start_iteration:
            return Fault("time_limit", "time_limit", detail="Megatron stopped at train.exit_duration_in_mins")
        return Fault(
            "suspected_bug",
            "clean exit without progress",
            detail="the ranks exited cleanly without saving a newer checkpoint: going on would loop",
        )
    first_rank = end.rank_failures[0] if end.rank_failures else None
    # The first task the launcher saw die (its list is in that order); a rank killed by a signal names
    # its node only there. Ranks a launcher stopped itself (SIGTERM, SIGINT) are not the cause.
    killed = [t for t in end.task_failures if t.signal and t.signal not in (2, 15)]
    first_task = killed[0] if killed else (end.task_failures[0] if end.task_failures else None)
    signal = first_task.signal if first_task else None
    hardware = bool(end.hardware_lines) or (signal in HARDWARE_SIGNALS)
    if first_rank is not None and not killed:
        nodes, ranks = (first_rank.node,), (first_rank.rank,)
        signature = f"{first_rank.exception} at {first_rank.where}"
        detail = f"rank {first_rank.rank} on {first_rank.node}: {first_rank.exception}: {first_rank.message}"[:500]
    elif first_task is not None:
        nodes = (first_task.node,) if first_task.node else ()
        ranks = (first_task.rank,) if first_task.rank is not None else ()
        what = HARDWARE_SIGNALS.get(signal) or (f"signal {signal}" if signal else f"exit code {first_task.exit_code}")
        signature = what
        detail = f"rank {first_task.rank} on {first_task.node}: {first_task.text}"
    else:
        nodes, ranks, signature, detail = (), (), f"exit code {end.exit_code}", f"ranks exited with {end.exit_code}"
    if end.hardware_lines:
        detail += f"; output: {end.hardware_lines[0]}"
    return Fault(
        "node_failure" if hardware else "crash",
        signature,
        nodes=nodes,
        ranks=ranks,
        hardware=hardware,
        detail=detail,
        traceback=first_rank.traceback if first_rank else None,
    )


@dataclass(frozen=True)
class Decision:
    go_on: bool  # requeue (Slurm) or relaunch (local)
    kind: str  # the event's class (a repeated failure becomes suspected_bug)
    exit_code: int  # the job's exit status when it stops
    reason: str
    exclude: tuple[str, ...] = ()  # nodes to add to the job's ExcNodeList


def failure_history(events: Iterable[Mapping]) -> list[Mapping]:
    """The run's earlier launch failures (hang, node_failure, crash), oldest first."""
    return [e for e in events if e.get("kind") in FAILURES]


def decide(
    fault: Fault,
    end: LaunchEnd,
    events: list[Mapping],
    resilience,
    excluded: Iterable[str] | None = (),
    verb="requeue",
) -> Decision:
    """What the run does after ``fault`` (module docstring). ``events``: events.jsonl so far, without
    this launch's end; ``excluded``: nodes already excluded from the job, None where nodes cannot be
    excluded (one machine); ``verb``: requeue (Slurm) or relaunch (one machine)."""
    if fault.kind == "finished":
        return Decision(False, "finished", 0, f"run finished (iteration {end.end_iteration})")
    if fault.kind in ("preempted", "time_limit"):
        return Decision(True, fault.kind, 0, f"{fault.kind}: {verb} to resume from iteration {end.end_iteration}")
    if fault.kind == "suspected_bug":
        return Decision(False, "suspected_bug", 3, f"suspected bug: {fault.detail}")
    if fault.kind == "bad_data":
        return Decision(False, "bad_data", EXIT_BAD_DATA, f"{BAD_DATA}: {fault.detail}")
    if fault.kind not in FAILURES:
        raise ValueError(f"decide() does not handle {fault.kind}: run/recovery.py does")
    k = int(resilience.max_same_failure)
    earlier = failure_history(events)
    # "At the same checkpoint": failures after which the run stood at the checkpoint it stands at now
    # (no newer one saved in between: no progress since).
    here = [e for e in earlier if e.get("end_iteration") == end.end_iteration]
    same = 1
    for e in reversed(here):
        if e.get("signature") != fault.signature:
            break
        same += 1
    if same >= k:
        where = f"rank {fault.ranks[0]} on {fault.nodes[0]}" if fault.ranks and fault.nodes else "the ranks"
        return Decision(
            False,
            "suspected_bug",
            1,
            f"suspected bug or bad data: the same failure ({fault.signature}) {same} times in a row at checkpoint "
            f"iteration {end.end_iteration}, at {where}; not going on",
        )
    without_progress = 1 + len(here)
    cap = int(resilience.max_failures_without_progress)
    if without_progress >= cap:
        return Decision(
            False,
            fault.kind,
            1,
            f"{without_progress} failures without a newer checkpoint than iteration {end.end_iteration} "
            f"(resilience.max_failures_without_progress={cap}): not going on",
        )
    exclude = () if excluded is None else nodes_to_exclude(fault, earlier, excluded)
    what = f"{verb} from iteration {end.end_iteration}" + (f" without node(s) {', '.join(exclude)}" if exclude else "")
    return Decision(True, fault.kind, 0, f"{fault.kind} ({fault.detail or fault.signature}): {what}", exclude)


def nodes_to_exclude(fault: Fault, earlier: list[Mapping], excluded: Iterable[str] = ()) -> tuple[str, ...]:
    """Hardware-looking failures exclude their node at once; other failures when one happened on the
    same node before in this run."""
    excluded = set(excluded)
    if fault.hardware:
        return tuple(n for n in fault.nodes if n not in excluded)
    seen = {n for e in earlier for n in (e.get("nodes") or [])}
    return tuple(n for n in fault.nodes if n in seen and n not in excluded)


def end_event(fault: Fault, end: LaunchEnd, decision: Decision, verb: str, exclude=(), note: str = "", **extra) -> dict:
    """The events.jsonl record of a launch's end (run/events.py lists its fields)."""
    action = (verb if decision.go_on else "stop") + f": {decision.reason}" + (f" ({note})" if note else "")
    return dict(
        kind=decision.kind,
        iteration=end.end_iteration,
        node=fault.nodes[0] if fault.nodes else None,
        action=action,
        launch=end.launch,
        start_iteration=end.start_iteration,
        end_iteration=end.end_iteration,
        nodes=list(fault.nodes),
        ranks=list(fault.ranks),
        signature=fault.signature,
        exit_code=end.exit_code,
        signal=end.signal,
        detail=fault.detail,
        exclude=list(exclude),
        traceback=fault.traceback if decision.kind in ("suspected_bug", "crash", "node_failure") else None,
        verdict=end.verdict,
        **extra,
    )
