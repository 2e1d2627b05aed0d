"""A launch's timeline, ``${run_dir}/timeline/<launch id>.jsonl``: when the ranks started, when
training began, when each iteration ended, when each save and validation pass began and ended.

Global rank 0 appends one JSON line per event (all ranks move in step through the collectives, so
one rank's clock is the launch's): ``{"t": unix time, "event": ..., "iteration": k}``. The run report
(tools/run_report.py) reads every launch's timeline beside ``events.jsonl`` to account for the
allocated time: set-up, training, saving, evaluation, and work lost to a failure.

Events: ``start`` (the rank's process started), ``train_start`` (set-up done, the loop begins),
``step`` (iteration k ended), ``save_start``/``save_end`` (checkpoint of iteration k),
``eval_start``/``eval_end``, ``done`` (the launch returned from the loop).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

TIMELINE_DIR = "timeline"  # in run_dir
LAUNCH_ID_ENV = "ELLAMA_LAUNCH_ID"  # set by the launchers, the same id as the launch's events
EVENTS = ("start", "train_start", "step", "save_start", "save_end", "eval_start", "eval_end", "done")


@dataclass(frozen=True)
class TimelineEvent:
    t: float
    event: str
    iteration: int


def timeline_path(run_dir: str | Path, launch_id: str) -> Path:
    return Path(run_dir) / TIMELINE_DIR / f"{launch_id}.jsonl"


class TimelineWriter:
    """Appends a launch's events; each line is one write, flushed, so a killed launch keeps all but
    the event it was writing."""

    def __init__(self, run_dir: str | Path, launch_id: str):
        self.path = timeline_path(run_dir, launch_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # open for the life of the rank

    def write(self, event: str, iteration: int, t: float | None = None) -> None:
        t = time.time() if t is None else t
        self._file.write(json.dumps({"t": round(t, 3), "event": event, "iteration": iteration}) + "\n")


def read_timeline(path: str | Path) -> list[TimelineEvent]:
    """A launch's events in order; a line cut short by a kill is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            out.append(TimelineEvent(float(record["t"]), str(record["event"]), int(record["iteration"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def read_timelines(run_dir: str | Path) -> dict[str, list[TimelineEvent]]:
    """Every launch's timeline in the run folder: launch id -> events."""
    folder = Path(run_dir) / TIMELINE_DIR
    return {p.stem: read_timeline(p) for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}


def default_launch_id() -> str:
    """The launch's id when no launcher set one (a rank started by hand)."""
    return os.environ.get(LAUNCH_ID_ENV) or f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getppid()}"
