"""The run report: what the allocation bought. From ``${run_dir}/events.jsonl`` (each launch's start
and end, run/events.py), every launch's timeline (``${run_dir}/timeline/<launch>.jsonl``,
formats/timeline.py) and, on Slurm, the job logs (when each batch script started), it accounts for
every second of every launch and says how much went into iterations that are in the final model.

Definitions (docs/slurm.md, "The run report"):

- A launch's **allocated** time runs from its ``launch`` event (on Slurm from the batch script's
  first log line when that is earlier: the job's own set-up) to its end event (its fault class). The
  wall time **between jobs** (one launch's end to the next one's start: a requeued job waiting in the
  queue) is shown apart and not counted as allocated; it is unknown after a launch without an end
  event (its launcher was killed), which is then counted up to its last timeline event.
- Within a launch, each stretch of time belongs to the timeline event that ends it: ``start`` and
  ``train_start`` end **start-up**; ``step`` k ends **iteration k** (from the previous step,
  train_start, save_end or eval_end); ``save_start``/``save_end`` end **saving**;
  ``eval_start``/``eval_end`` end **evaluation**; ``done`` and the end event end **teardown** (after
  the last timeline event: the iteration in progress when a fault struck, the time to notice it, the
  processes' exit). A launch without a timeline is start-up throughout.
- Iteration k run by launch L is **productive** when it is in the final model: L kept it (its
  checkpoint after it, ``end_iteration``, is at least k) and no later launch ended below it (a
  rollback: ``end_iteration`` = ``resumed_from``) before the run's last checkpoint. Iterations a
  launch ran past its last checkpoint are **lost work**, charged to the class of the launch's end;
  iterations a rollback discarded, to the rollback's class. Skipped iterations are never productive.
- **Goodput** = productive / allocated. **Time lost per fault class**: the lost work charged to it,
  the teardown of the launches it ended, and the start-up of the launch after each (the restart).
  **Restarts** = launches - 1. **Time to recover** from an interruption (every class but finished and
  suspected_bug): from the interrupted launch's last timeline event (its end event without one) to
  the end of the next step any later launch completes; the mean over all, and over the unplanned
  ones (hang, node_failure, crash, rejected_result) apart from preemptions and time limits.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

from ellama_megatron.formats.atomic import write_figure_atomic, write_json_atomic, write_text_atomic
from ellama_megatron.formats.timeline import TIMELINE_DIR, TimelineEvent, read_timelines
from ellama_megatron.formats.train_log import job_starts
from ellama_megatron.run.events import EVENT_TIME_FORMAT, EVENTS_FILE, read_events
from ellama_megatron.run.faults import FAILURES, FAULT_CLASSES

REPORT_DIR = "report"  # in run_dir
REPORT_MD, REPORT_JSON, REPORT_PNG = "run_report.md", "run_report.json", "run_timeline.png"

# Categories of allocated time, in the order of the table and the picture.
STARTUP, PRODUCTIVE, LOST, SAVING, EVALUATION, TEARDOWN = (
    "start-up",
    "training (productive)",
    "training (lost)",
    "saving",
    "evaluation",
    "teardown",
)
CATEGORIES = (STARTUP, PRODUCTIVE, LOST, SAVING, EVALUATION, TEARDOWN)
BETWEEN = "between jobs"  # not allocated
TRAINING = "training"  # a step whose fate (productive or lost) is decided once every launch is read
# What the timeline event that ends a stretch of time says it was (formats/timeline.py's events).
ENDED_BY = {
    "start": STARTUP,
    "train_start": STARTUP,
    "step": TRAINING,
    "save_start": SAVING,
    "save_end": SAVING,
    "eval_start": EVALUATION,
    "eval_end": EVALUATION,
    "done": TEARDOWN,
}
UNKNOWN_END = "unknown"  # a launch without an end event
# Ends a later launch recovers from (a suspected bug or bad data stops the run), and those no one planned.
INTERRUPTIONS = tuple(kind for kind in FAULT_CLASSES if kind not in ("finished", "suspected_bug", "bad_data"))
UNPLANNED = ("rejected_result", *FAILURES)
# launch/slurm.py's prepare_job, the first line a job (or each requeue of it) writes to its log:
# "[launch 12:03:44] job 4711 restart 2: 8 nodes x 8 ranks". Time of day only; the date comes from
# the launch event that follows it.
_SLURM_LAUNCH_ID = re.compile(r"^(\d+)\.(\d+)$")  # "<job>.<restart>", launch/slurm.py's launch ids
JOB_LOG_ROOT_ENV = "ELLAMA_LOG_ROOT"  # slurm/launch.sh's log root, default slurm/logs
MAX_BATCH_SETUP_S = 3600.0  # a batch-script start this much before its launch event is another job's


@dataclass(frozen=True)
class Segment:
    """A stretch of a launch's allocated time, all of one category."""

    category: str
    start: float  # unix time
    end: float
    iteration: int | None = None  # the iteration a training step ran

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Launch:
    """One launch as the report sees it."""

    id: str  # its launch id (events, timeline file)
    start: float  # allocated from: the batch script's start on Slurm when earlier, else the launch event
    launch_time: float  # its launch event
    end: float  # its end event, or its last timeline event without one
    end_kind: str  # the end event's class (run/faults.py), or UNKNOWN_END
    start_iteration: int
    end_iteration: int  # the newest complete checkpoint after it
    action: str = ""
    end_known: bool = False  # whether ``end`` is its end event's time (else its last timeline event's)
    job: str | None = None
    restart: int | None = None
    zone: tzinfo | None = None  # of its launch event's ``time``: the launcher's clock
    timeline: bool = True  # whether it has one
    segments: list[Segment] = field(default_factory=list)
    skipped: tuple[int, ...] = ()  # iterations its end (a skip or rollback) passes over in later launches
    lost_to: dict[int, str] = field(default_factory=dict)  # lost iteration -> the class charged with it
    first_step_end: float | None = None
    last_progress: float | None = None  # its last timeline event

    @property
    def allocated_s(self) -> float:
        return self.end - self.start

    def seconds(self, category: str) -> float:
        return sum(s.seconds for s in self.segments if s.category == category)

    @property
    def productive_iterations(self) -> list[int]:
        return [s.iteration for s in self.segments if s.category == PRODUCTIVE]


@dataclass(frozen=True)
class Gap:
    """Wall time between two launches, not allocated; ``seconds`` None where unknown."""

    after: str
    before: str
    start: float
    end: float
    seconds: float | None


@dataclass(frozen=True)
class Recovery:
    launch: str  # the interrupted launch
    kind: str
    seconds: float


@dataclass
class FaultCost:
    """What one fault class cost the run, in allocated seconds (between jobs apart)."""

    launches: int = 0
    lost_work_s: float = 0.0
    lost_iterations: int = 0
    teardown_s: float = 0.0
    restart_s: float = 0.0  # the start-up of the launch after each
    between_jobs_s: float = 0.0  # not allocated; the known gaps only

    @property
    def total_s(self) -> float:
        return self.lost_work_s + self.teardown_s + self.restart_s


@dataclass
class RunReport:
    run_dir: str
    launches: list[Launch]
    gaps: list[Gap]
    final_iteration: int
    recoveries: list[Recovery]
    notes: list[str]

    @property
    def allocated_s(self) -> float:
        return sum(launch.allocated_s for launch in self.launches)

    def seconds(self, category: str) -> float:
        return sum(launch.seconds(category) for launch in self.launches)

    @property
    def productive_s(self) -> float:
        return self.seconds(PRODUCTIVE)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.allocated_s if self.allocated_s > 0 else 0.0

    @property
    def restarts(self) -> int:
        return max(len(self.launches) - 1, 0)

    @property
    def between_jobs_s(self) -> float:
        return sum(g.seconds for g in self.gaps if g.seconds is not None)

    @property
    def productive_iterations(self) -> int:
        return sum(len(launch.productive_iterations) for launch in self.launches)

    def mean_time_to_recover(self, kinds: Sequence[str] = INTERRUPTIONS) -> float | None:
        times = [r.seconds for r in self.recoveries if r.kind in kinds]
        return sum(times) / len(times) if times else None

    def fault_costs(self) -> dict[str, FaultCost]:
        """Fault class -> its cost, for every class that ended a launch or had work charged to it
        (finished is no fault: its teardown is overhead, as the first launch's start-up is)."""
        costs: dict[str, FaultCost] = {}
        by_launch = {launch.id: launch for launch in self.launches}
        for i, launch in enumerate(self.launches):
            for segment in launch.segments:
                if segment.category == LOST:
                    cost = costs.setdefault(launch.lost_to[segment.iteration], FaultCost())
                    cost.lost_work_s += segment.seconds
                    cost.lost_iterations += 1
            if launch.end_kind == "finished":
                continue
            cost = costs.setdefault(launch.end_kind, FaultCost())
            cost.launches += 1
            cost.teardown_s += launch.seconds(TEARDOWN)
            if i + 1 < len(self.launches):
                cost.restart_s += self.launches[i + 1].seconds(STARTUP)
        for gap in self.gaps:
            ended = by_launch[gap.after].end_kind
            if gap.seconds is not None and ended in costs:
                costs[ended].between_jobs_s += gap.seconds
        order = {kind: n for n, kind in enumerate((*FAULT_CLASSES, UNKNOWN_END))}
        return dict(sorted(costs.items(), key=lambda kv: order.get(kv[0], len(order))))

    def to_json(self) -> dict:
        def r(x):
            return None if x is None else round(x, 3)

        return {
            "run_dir": self.run_dir,
            "allocated_s": r(self.allocated_s),
            "productive_s": r(self.productive_s),
            "goodput": round(self.goodput, 6),
            "final_iteration": self.final_iteration,
            "productive_iterations": self.productive_iterations,
            "seconds": {category: r(self.seconds(category)) for category in CATEGORIES},
            "between_jobs_s": r(self.between_jobs_s),
            "between_jobs_unknown": sum(g.seconds is None for g in self.gaps),
            "restarts": self.restarts,
            "mean_time_to_recover_s": r(self.mean_time_to_recover()),
            "mean_time_to_recover_unplanned_s": r(self.mean_time_to_recover(UNPLANNED)),
            "recoveries": [asdict(x) | {"seconds": r(x.seconds)} for x in self.recoveries],
            "lost_by_class": {
                kind: {
                    **{k: r(v) if isinstance(v, float) else v for k, v in asdict(c).items()},
                    "total_s": r(c.total_s),
                }
                for kind, c in self.fault_costs().items()
            },
            "launches": [
                {
                    "launch": launch.id,
                    "job": launch.job,
                    "restart": launch.restart,
                    "start": r(launch.start),
                    "launch_time": r(launch.launch_time),
                    "end": r(launch.end),
                    "end_kind": launch.end_kind,
                    "action": launch.action,
                    "start_iteration": launch.start_iteration,
                    "end_iteration": launch.end_iteration,
                    "allocated_s": r(launch.allocated_s),
                    "seconds": {category: r(launch.seconds(category)) for category in CATEGORIES},
                    "productive_iterations": len(launch.productive_iterations),
                    "lost_iterations": len(launch.lost_to),
                    "timeline": launch.timeline,
                }
                for launch in self.launches
            ],
            "gaps": [asdict(g) | {"seconds": r(g.seconds)} for g in self.gaps],
            "notes": self.notes,
        }


# -- reading ---------------------------------------------------------------------------------------


def event_time(event: dict, events_path: Path, line: int) -> float:
    """The event's unix time ``t``; from its ``time`` (whole seconds) where it has none (an older run)."""
    if isinstance(event.get("t"), (int, float)):
        return float(event["t"])
    try:
        return datetime.strptime(event["time"], EVENT_TIME_FORMAT).timestamp()
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{events_path}: line {line}: time {event.get('time')!r} is not {EVENT_TIME_FORMAT}; "
            "the launchers write it (run/events.py): repair or remove the line"
        ) from None


def _zone(stamp) -> tzinfo | None:
    try:
        return datetime.strptime(stamp, EVENT_TIME_FORMAT).tzinfo
    except (TypeError, ValueError):
        return None


def batch_starts(texts: Iterable[str]) -> dict[tuple[str, int], str]:
    """(job, restart) -> the time of day its batch script logged its first line (the last such line
    per pair: a job log appended across requeues repeats nothing, but a resubmission may)."""
    out = {}
    for text in texts:
        for clock, job, restart in job_starts(text):
            out[(job, restart)] = clock
    return out


def job_logs(run_dir: Path, jobs: Iterable[str], roots: Sequence[Path] = ()) -> list[Path]:
    """The Slurm job logs of ``jobs`` (``<name>-<job>.out`` under slurm/launch.sh's log root,
    ELLAMA_LOG_ROOT or slurm/logs) and the run's own train.log, where they exist."""
    roots = list(roots) or [Path(os.environ.get(JOB_LOG_ROOT_ENV) or "slurm/logs")]
    found = [run_dir / "train.log"] if (run_dir / "train.log").is_file() else []
    for root in roots:
        if root.is_file():
            found.append(root)
            continue
        for job in jobs:
            found += sorted(root.glob(f"*-{job}.out"))
    return list(dict.fromkeys(found))


def _at_time_of_day(hms: str, near: float, zone: tzinfo | None) -> float:
    """The moment at or before ``near`` (within a day) whose time of day in ``zone`` (the launch
    event's: the batch host's clock) is ``hms``."""
    moment = datetime.fromtimestamp(near, zone)
    h, m, s = (int(x) for x in hms.split(":"))
    candidate = moment.replace(hour=h, minute=m, second=s, microsecond=0)
    if candidate.timestamp() > near + 1:  # the line's second is truncated too
        candidate -= timedelta(days=1)
    return candidate.timestamp()


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such folder; give the run folder (the run's run_dir)")
    if not (run_dir / EVENTS_FILE).is_file():
        raise ValueError(
            f"{run_dir / EVENTS_FILE}: not found; give a run folder a launcher has started "
            "(recipes/cpt.py or slurm/launch.sh write it)"
        )


def build_report(run_dir: str | Path, logs: Sequence[str | Path] = ()) -> RunReport:
    """The report of the run in ``run_dir``; ``logs``: Slurm job logs (files, or folders holding
    ``<name>-<job>.out``), default ELLAMA_LOG_ROOT or slurm/logs."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    events_path = run_dir / EVENTS_FILE
    try:
        events = read_events(run_dir)
    except ValueError as e:
        raise ValueError(f"{events_path}: not JSON lines ({e}); repair or remove the broken line") from None
    timelines = read_timelines(run_dir)
    if not timelines:
        raise ValueError(
            f"{run_dir / TIMELINE_DIR}: no launch timelines; global rank 0 writes timeline/<launch>.jsonl "
            "(engine/megatron_hooks.py): report a run trained by this version"
        )
    notes: list[str] = []
    launches = _launches_from_events(events, events_path, timelines)
    if not launches:
        raise ValueError(
            f"{events_path}: no launch events; every launch appends one when it starts "
            "(launch/torchrun.py, launch/slurm.py): report a run started by this version"
        )
    for launch in launches:
        if not launch.end_known:
            notes.append(
                f"launch {launch.id} has no end event of its own time (its launcher was killed, or it is still "
                "running): counted up to its last timeline event"
            )
    for stray in sorted(set(timelines) - {launch.id for launch in launches}):
        notes.append(f"timeline {stray} has no launch event: not counted")
    jobs = {launch.job for launch in launches if launch.job}
    if jobs:
        paths = job_logs(run_dir, sorted(jobs), [Path(p) for p in logs])
        starts = batch_starts(p.read_text(errors="replace") for p in paths)
        _apply_batch_starts(launches, starts)
    for launch in launches:  # event times are whole seconds: a launch lasts at least to its last timeline event
        launch.end = max([launch.end, *(e.t for e in timelines.get(launch.id, []))])
    gaps = _separate(launches, notes)
    for launch in launches:
        _account(launch, timelines.get(launch.id))
    final = _settle(launches)
    return RunReport(str(run_dir), launches, gaps, final, _recoveries(launches), notes)


def _launches_from_events(events: list[dict], path: Path, timelines: dict) -> list[Launch]:
    launches: list[Launch] = []
    by_id: dict[str, Launch] = {}
    current: Launch | None = None
    for line, event in enumerate(events, 1):
        kind = event.get("kind")
        if kind == "launch":
            if current is not None:
                _close_without_end(current, timelines)
            current = Launch(
                id=str(event.get("launch")),
                start=event_time(event, path, line),
                launch_time=event_time(event, path, line),
                end=math.nan,
                end_kind=UNKNOWN_END,
                start_iteration=int(event.get("start_iteration") or 0),
                end_iteration=int(event.get("start_iteration") or 0),
                job=None if event.get("job") is None else str(event["job"]),
                restart=None if event.get("restart") is None else int(event["restart"]),
                zone=_zone(event.get("time")),
            )
            slurm_id = _SLURM_LAUNCH_ID.match(current.id)
            if slurm_id and current.job is None:
                current.job, current.restart = slurm_id.group(1), int(slurm_id.group(2))
            launches.append(current)
            by_id[current.id] = current
        elif kind in FAULT_CLASSES and current is not None and event.get("launch") in (None, current.id):
            _end(current, event, kind)
            current.end = event_time(event, path, line)
            current.end_known = True
            current = None
        elif kind in FAULT_CLASSES and (late := by_id.get(event.get("launch"))) and late.end_kind == UNKNOWN_END:
            # Written after the next launch had started (for a launcher that died with its node): the
            # class holds, the event's time is not the launch's end.
            _end(late, event, kind)
    if current is not None:
        _close_without_end(current, timelines)
    return launches


def _end(launch: Launch, event: dict, kind: str) -> None:
    launch.end_kind = kind
    launch.action = str(event.get("action") or "")
    end = event.get("end_iteration", event.get("iteration"))
    launch.end_iteration = int(end) if end is not None else launch.start_iteration
    launch.skipped = tuple(int(i) for i in event.get("skipped") or ())


def _close_without_end(launch: Launch, timelines: dict) -> None:
    """A launch whose launcher wrote no end event in time (killed, or still running): counted up to
    its last timeline event; its checkpoint after it, the newest save it completed."""
    timeline = timelines.get(launch.id, [])
    launch.end = max([launch.launch_time, *(e.t for e in timeline)])
    saved = [e.iteration for e in timeline if e.event == "save_end"]
    launch.end_iteration = max([launch.start_iteration, *saved])


def _apply_batch_starts(launches: list[Launch], starts: dict[tuple[str, int], str]) -> None:
    for launch in launches:
        hms = starts.get((launch.job, launch.restart if launch.restart is not None else 0))
        if hms is None:
            continue
        t = _at_time_of_day(hms, launch.launch_time, launch.zone)
        if launch.launch_time - MAX_BATCH_SETUP_S < t < launch.start:
            launch.start = t


def _separate(launches: list[Launch], notes: list[str]) -> list[Gap]:
    """The gaps between launches; a launch starting before the previous one's end (second-resolution
    event times) starts at that end, so no second is counted twice."""
    gaps = []
    for before, after in zip(launches, launches[1:]):
        after.start = max(after.start, before.end)
        known = before.end_known
        gaps.append(Gap(before.id, after.id, before.end, after.start, after.start - before.end if known else None))
    if any(g.seconds is None for g in gaps):
        notes.append("the time between jobs after a launch without an end event is unknown")
    return gaps


def _account(launch: Launch, timeline: list[TimelineEvent] | None) -> None:
    """Cut the launch's allocated time into segments at its timeline's events."""
    if not timeline:
        launch.timeline = False
        launch.segments = [Segment(STARTUP, launch.start, launch.end)]
        return
    events = [e for e in sorted(timeline, key=lambda e: e.t) if e.event in ENDED_BY]
    cursor = launch.start
    for e in events:
        t = max(e.t, cursor)
        category = ENDED_BY[e.event]
        launch.segments.append(Segment(category, cursor, t, e.iteration if category == TRAINING else None))
        cursor = t
        if e.event == "step" and launch.first_step_end is None:
            launch.first_step_end = t
    launch.last_progress = cursor
    launch.segments.append(Segment(TEARDOWN, cursor, launch.end))


def _settle(launches: list[Launch]) -> int:
    """Decide which steps are in the final model (the rules in the module docstring); returns the
    run's last checkpoint's iteration."""
    skipped: set[int] = set()  # by the skips and rollbacks so far
    owner: dict[int, tuple[Launch, int]] = {}  # iteration -> (launch, segment index) kept so far
    for launch in launches:
        for n, segment in enumerate(launch.segments):
            if segment.category != TRAINING:
                continue
            k = segment.iteration
            if k in owner:  # run again: the earlier run of it was not kept
                earlier, m = owner.pop(k)
                earlier.lost_to.setdefault(k, earlier.end_kind)
            if k <= launch.end_iteration and k not in skipped:
                owner[k] = (launch, n)
            else:
                launch.lost_to[k] = "rejected_result" if k in skipped else launch.end_kind
        for k in [k for k in owner if k > launch.end_iteration]:  # a rollback deleted their checkpoints
            earlier, _ = owner.pop(k)
            earlier.lost_to[k] = launch.end_kind
        skipped |= set(launch.skipped)
    for launch in launches:
        launch.segments = [
            Segment(LOST if s.iteration in launch.lost_to else PRODUCTIVE, s.start, s.end, s.iteration)
            if s.category == TRAINING
            else s
            for s in launch.segments
        ]
    return launches[-1].end_iteration


def _recoveries(launches: list[Launch]) -> list[Recovery]:
    out = []
    for i, launch in enumerate(launches):
        if launch.end_kind not in INTERRUPTIONS:
            continue
        back = next((later.first_step_end for later in launches[i + 1 :] if later.first_step_end is not None), None)
        if back is None:
            continue
        since = launch.last_progress if launch.last_progress is not None else launch.end
        out.append(Recovery(launch.id, launch.end_kind, back - since))
    return out


# -- writing ---------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``3 h 02 min``; ``unknown`` for None."""
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


def markdown(report: RunReport) -> str:
    """The report as Markdown, beside its picture."""
    alloc = report.allocated_s
    lines = [
        f"# Run report: {Path(report.run_dir).name}",
        "",
        f"{len(report.launches)} launch(es), {report.restarts} restart(s); the final model is iteration "
        f"{report.final_iteration}. Goodput **{100 * report.goodput:.1f}%**: {duration(report.productive_s)} of "
        f"{duration(alloc)} allocated went into the {report.productive_iterations} iterations in the final model.",
        "",
        "| time | seconds | share of allocated |",
        "|---|---:|---:|",
        f"| allocated (launch start to launch end, summed over launches) | {alloc:.1f} | 100% |",
    ]
    for category in CATEGORIES:
        what = {
            PRODUCTIVE: "training: iterations in the final model (productive)",
            LOST: "training: iterations lost (run past the last checkpoint, or rolled back)",
        }.get(category, category)
        lines.append(f"| {what} | {report.seconds(category):.1f} | {_share(report.seconds(category), alloc)} |")
    unknown = sum(g.seconds is None for g in report.gaps)
    lines.append(
        f"| between jobs (queueing, requeue wait; not allocated) | {report.between_jobs_s:.1f}"
        + (f" + {unknown} unknown" if unknown else "")
        + " | - |"
    )
    mttr, unplanned = report.mean_time_to_recover(), report.mean_time_to_recover(UNPLANNED)
    n_all = sum(r.kind in INTERRUPTIONS for r in report.recoveries)
    n_unplanned = sum(r.kind in UNPLANNED for r in report.recoveries)
    if mttr is None:
        lines += ["", "No interruption the run recovered from: no time to recover.", ""]
    else:
        lines += [
            "",
            f"Mean time to recover: {duration(mttr)} over {n_all} interruption(s); unplanned failures only: "
            + (f"{duration(unplanned)} over {n_unplanned}" if unplanned is not None else "none")
            + " (from the last timeline event of the interrupted launch to the next completed step).",
            "",
        ]
    costs = report.fault_costs()
    if costs:
        lines += [
            "## Time lost per fault class",
            "",
            "| class | launches ended | lost work (iterations) | teardown | restart (next start-up) | total | "
            "share of allocated | between jobs after (not allocated) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, c in costs.items():
            lines.append(
                f"| {kind} | {c.launches} | {c.lost_work_s:.1f} s ({c.lost_iterations}) | {c.teardown_s:.1f} s | "
                f"{c.restart_s:.1f} s | {c.total_s:.1f} s | {_share(c.total_s, alloc)} | {c.between_jobs_s:.1f} s |"
            )
        lines.append("")
    lines += [
        "## Launches",
        "",
        "| # | launch | iterations | allocated | start-up | productive | lost | saving | evaluation | teardown | "
        "ended |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, launch in enumerate(report.launches, 1):
        cells = " | ".join(f"{launch.seconds(c):.1f}" for c in CATEGORIES)
        lines.append(
            f"| {n} | {launch.id} | {launch.start_iteration} -> {launch.end_iteration} | "
            f"{launch.allocated_s:.1f} | {cells} | {launch.end_kind} |"
        )
    lines += ["", "Seconds of wall time (not node-hours).", "", f"![run timeline]({REPORT_PNG})"]
    if report.notes:
        lines += ["", "Notes:", "", *[f"- {note}" for note in report.notes]]
    return "\n".join(lines) + "\n"


COLORS = {
    STARTUP: "#9e9e9e",
    PRODUCTIVE: "#2e7d32",
    LOST: "#d32f2f",
    SAVING: "#1565c0",
    EVALUATION: "#7b1fa2",
    TEARDOWN: "#ef6c00",
    BETWEEN: "#e0e0e0",
}


def _merged(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of one category as one (thousands of steps draw as one bar)."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].category == s.category and abs(out[-1].end - s.start) < 1e-9:
            out[-1] = Segment(s.category, out[-1].start, s.end)
        else:
            out.append(s)
    return out


def plot_timeline(report: RunReport, out_png: str | Path) -> Path:
    """One horizontal bar per launch on the run's time axis, colored by category; the time between
    jobs hatched; each launch's end class written after its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = report.launches[0].start
    span = max(report.launches[-1].end - t0, 1e-3)
    unit, scale = ("s", 1.0) if span < 600 else ("min", 60.0) if span < 36000 else ("h", 3600.0)
    n = len(report.launches)
    fig, ax = plt.subplots(figsize=(12, min(max(3.2, 1.4 + 0.45 * n), 24)))
    for row, launch in enumerate(report.launches):
        for s in _merged(launch.segments):
            ax.broken_barh(
                [((s.start - t0) / scale, s.seconds / scale)], (row - 0.35, 0.7), facecolors=COLORS[s.category]
            )
        ax.text(
            (launch.end - t0) / scale + span / scale * 0.005,
            row,
            launch.end_kind,
            va="center",
            fontsize=8 if n < 30 else 6,
        )
    for row, gap in enumerate(report.gaps, 1):
        if gap.end > gap.start:
            ax.broken_barh(
                [((gap.start - t0) / scale, (gap.end - gap.start) / scale)],
                (row - 0.35, 0.7),
                facecolors=COLORS[BETWEEN],
                hatch="//" if gap.seconds is not None else "..",
                edgecolor="#9e9e9e",
            )
    ax.set_yticks(range(n))
    names = [x.id if len(x.id) <= 32 else "..." + x.id[-29:] for x in report.launches]
    ax.set_yticklabels([f"{i}: {name}" for i, name in enumerate(names, 1)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, span / scale * 1.12)  # room for the class labels
    ax.set_xlabel(f"time since the first launch ({unit})")
    ax.set_title(
        f"{Path(report.run_dir).name}: goodput {100 * report.goodput:.1f}% "
        f"({duration(report.productive_s)} of {duration(report.allocated_s)}), {report.restarts} restart(s)"
    )
    ax.legend(
        handles=[Patch(facecolor=COLORS[c], label=c) for c in CATEGORIES]
        + [Patch(facecolor=COLORS[BETWEEN], hatch="//", edgecolor="#9e9e9e", label=f"{BETWEEN} (not allocated)")],
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    return write_figure_atomic(out_png, fig)


def write_report(report: RunReport, out_dir: str | Path) -> dict[str, Path]:
    """run_report.md, run_report.json and run_timeline.png in ``out_dir``, each written whole."""
    out_dir = Path(out_dir)
    return {
        "md": write_text_atomic(out_dir / REPORT_MD, markdown(report)),
        "json": write_json_atomic(out_dir / REPORT_JSON, report.to_json()),
        "png": plot_timeline(report, out_dir / REPORT_PNG),
    }


def summary_line(report: RunReport) -> str:
    lost = ", ".join(f"{kind} {duration(c.total_s)}" for kind, c in report.fault_costs().items()) or "nothing"
    mttr = report.mean_time_to_recover()
    return (
        f"goodput {100 * report.goodput:.1f}%: {duration(report.productive_s)} productive of "
        f"{duration(report.allocated_s)} allocated over {len(report.launches)} launch(es), {report.restarts} "
        f"restart(s), lost: {lost}" + (f"; mean time to recover {duration(mttr)}" if mttr is not None else "")
    )
