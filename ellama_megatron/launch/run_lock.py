"""One run per folder: an exclusive flock on ``${run_dir}/run.lock``, held by whatever launched the
ranks (recipes/cpt.py and its torchrun, or slurm/launch.sh) for as long as they train.

Two launches on one run folder would both write the same iter_* checkpoints, and the second would
rewrite the config.yaml the first one's ranks read by path. The lock is taken before config.yaml is
written and released by the kernel when its holder dies (kill -9 included), so a stale lock never
blocks a relaunch. The file's text names the holder (host, pid, start time) for the refusal.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"  # in run_dir


class RunLockedError(ValueError):
    """Another launch holds the run folder; the message names it. A ValueError, as bad input is:
    every launcher already reports those and stops before any work."""


def holder_line(pid: int | None = None) -> str:
    """What the lock file says about its holder."""
    return f"host={socket.gethostname()} pid={pid or os.getpid()} start={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"


_HELD: dict[Path, int] = {}  # run folders this process holds: a second flock from it would refuse it


def hold_run_lock(run_dir: str | Path) -> None:
    """``take_run_lock`` for the rest of this process's life (the launcher lives as long as its ranks)."""
    key = Path(run_dir).resolve()
    if key not in _HELD:
        _HELD[key] = take_run_lock(run_dir)


def take_run_lock(run_dir: str | Path) -> int:
    """Lock ``run_dir`` for this process; returns the open descriptor that holds it (keep it open;
    closing it or exiting releases the lock). Raises RunLockedError naming the holder when another
    process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().strip() or "a process that has not written its name yet"
        os.close(fd)
        raise RunLockedError(
            f"{path}: run folder {run_dir} is in use by another launch ({holder}); wait for it to end, "
            f"stop it, or give this launch its own run_dir="
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder_line().encode(), 0)
    return fd
