"""Per-rank progress heartbeats, written by each training rank and read by the watchdog beside it.

A hung rank cannot report itself, so each rank says what it is doing as it goes: one small JSON
file per rank, replaced whole at each beat (write to a temporary name, rename: a reader never sees
half a record), in a node-local folder (``ELLAMA_HEARTBEAT_DIR``; the launchers put it under
/dev/shm): a write per step from hundreds of ranks is load a shared filesystem does not need, and
the watchdog that reads them runs on the same node.

A record: rank, local rank, pid, node, phase (``setup``, ``step``, ``save``, ``eval``, ``done``),
stage within a step (``compute``, then ``reduce`` once the gradient reduction begins), iteration,
the wall time of the beat, and the rank's median step time so far (seconds; None before its first
steps), from which the watchdog derives the step timeout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEARTBEAT_DIR_ENV = "ELLAMA_HEARTBEAT_DIR"  # set by the launchers; unset: the rank beats nowhere
PHASES = ("setup", "step", "save", "eval", "done")
STAGES = ("compute", "reduce")  # within a step: computing, or waiting in the gradient reduction


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    local_rank: int
    pid: int
    node: str
    phase: str
    iteration: int
    time: float  # time.time() of the beat
    stage: str | None = None  # in phase "step" only
    median_step_s: float | None = None

    @property
    def progress(self) -> tuple[int, int]:
        """Orders ranks by how far they got: iteration, then reduce after compute within a step."""
        return self.iteration, (1 if self.stage == "reduce" else 0)


def heartbeat_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:05d}.json"


class HeartbeatWriter:
    """One rank's heartbeat file. ``beat`` costs a small write and a rename (tens of microseconds on
    tmpfs), once per phase change and step."""

    def __init__(self, folder: str | Path, rank: int, local_rank: int, node: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = heartbeat_path(self.folder, rank)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.identity = {"rank": rank, "local_rank": local_rank, "pid": os.getpid(), "node": node}

    def beat(
        self, phase: str, iteration: int, stage: str | None = None, median_step_s: float | None = None
    ) -> Heartbeat:
        record = Heartbeat(
            **self.identity,
            phase=phase,
            iteration=iteration,
            time=time.time(),
            stage=stage,
            median_step_s=median_step_s,
        )
        self._tmp.write_text(json.dumps(asdict(record)))
        os.replace(self._tmp, self.path)
        return record


def read_heartbeats(folder: str | Path) -> dict[int, Heartbeat]:
    """Every rank's latest heartbeat in ``folder`` (rank -> record); unreadable files are skipped."""
    out = {}
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            record = Heartbeat(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # removed between glob and read, or not ours
        out[record.rank] = record
    return out
