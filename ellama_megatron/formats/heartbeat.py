"""Per-rank progress heartbeats, written by each training rank and read by the watchdog beside it.

A hung rank cannot report itself, so each rank says what it is doing as it goes: one small JSON
file per rank, replaced whole at each beat (write to a temporary name, rename: a reader never sees
half a record), in a node-local folder (``ELLAMA_HEARTBEAT_DIR``; the launchers put it under
/dev/shm): a write per step from hundreds of ranks is load a shared filesystem does not need, and
the watchdog that reads them runs on the same node.

A record: rank, local rank, pid, node, the beat's sequence number, phase (``setup``, ``step``,
``save``, ``eval``, ``done``),
stage within a step (``compute``, then ``reduce`` once the gradient reduction begins), iteration,
the wall time of the beat, and the rank's median step time so far (seconds; None before its first
steps), from which the watchdog derives the step timeout. Every rank runs the same loop and beats
at the same points of it, so the sequence numbers compare across ranks: the rank with the lowest is
the one the others wait for.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HEARTBEAT_DIR_ENV = "ELLAMA_HEARTBEAT_DIR"  # set by the launchers; unset: the rank beats nowhere
PHASES = ("setup", "step", "save", "eval", "done")
FLIGHT_RECORDER_REQUEST = "fr_dump_request"  # the watchdog asks the ranks for their collective traces
STAGES = ("compute", "reduce")  # within a step: computing, or waiting in the gradient reduction


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    local_rank: int
    pid: int
    node: str
    seq: int  # beats so far, from 1: the same point of the loop has the same number on every rank
    phase: str
    iteration: int
    time: float  # time.time() of the beat
    stage: str | None = None  # in phase "step" only
    median_step_s: float | None = None


def heartbeat_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:05d}.json"


def stack_file(folder: str | Path, rank: int) -> Path:
    """Where a rank's faulthandler writes its stacks when the watchdog signals it (SIGUSR2)."""
    return Path(folder) / f"rank{rank:05d}.stacks"


class HeartbeatWriter:
    """One rank's heartbeat file. ``beat`` costs a small write and a rename (tens of microseconds on
    tmpfs), once per phase change and step."""

    def __init__(self, folder: str | Path, rank: int, local_rank: int, node: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = heartbeat_path(self.folder, rank)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.identity = {"rank": rank, "local_rank": local_rank, "pid": os.getpid(), "node": node}
        self.seq = 0

    def beat(
        self, phase: str, iteration: int, stage: str | None = None, median_step_s: float | None = None
    ) -> Heartbeat:
        self.seq += 1
        record = Heartbeat(
            **self.identity,
            seq=self.seq,
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
