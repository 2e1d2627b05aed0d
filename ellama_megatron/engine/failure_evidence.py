"""What a rank leaves behind when it fails or hangs, for the launcher and the watchdog to read.

- An exception that ends the rank is written to ``${run_dir}/failures/<launch>/rank<N>.json``
  (type, message, innermost file:line, traceback, node, iteration) before it propagates: the
  launcher names the failing rank and compares failures across launches (run/faults.py); under srun
  a rank's traceback would otherwise be one of hundreds interleaved in the job's output.
- faulthandler is registered on SIGUSR2, writing every thread's stack to a node-local file beside
  the rank's heartbeat: the watchdog signals a rank it found hung and copies the file into the run
  folder. It runs in the signal handler itself, so it answers while the rank is blocked in a
  collective (but not while it is stopped: py-spy reads those).
- A daemon thread waits for the watchdog's request and dumps PyTorch's flight recorder (the
  collectives this rank issued and their state, ``flight_recorder/fr_trace_<N>``), which
  ``python -m torch.distributed.flight_recorder.fr_trace DIR -p fr_trace`` reads across ranks to find the collective
  a rank never joined. The recorder is on (``TORCH_FR_BUFFER_SIZE``, ``TORCH_NCCL_TRACE_BUFFER_SIZE``,
  set before the process groups start) and also dumps by itself on an NCCL timeout.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

from ellama_megatron.formats.atomic import write_bytes_atomic
from ellama_megatron.formats.heartbeat import FLIGHT_RECORDER_REQUEST, HEARTBEAT_DIR_ENV, stack_file
from ellama_megatron.run.faults import HANGS_DIR, RankFailure, write_rank_failure

FLIGHT_RECORDER_DIR = "flight_recorder"  # in hangs/<launch>/
FLIGHT_RECORDER_ENTRIES = "2000"  # collectives kept per process group: a few steps' worth


def flight_recorder_environment(run_dir: str | Path) -> dict[str, str]:
    """Set in the rank before torch.distributed starts (the launch may override each)."""
    return {
        "TORCH_FR_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES,
        "TORCH_NCCL_TRACE_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES,
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(Path(run_dir) / HANGS_DIR / "nccl_timeout" / "trace_"),
    }


def arm(rank: int) -> None:
    """faulthandler on SIGUSR2 and the flight-recorder thread, when a launcher runs a watchdog
    (ELLAMA_HEARTBEAT_DIR set)."""
    folder = os.environ.get(HEARTBEAT_DIR_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    stacks = open(stack_file(folder, rank), "w")  # noqa: SIM115 -- kept open: faulthandler writes to its fd
    faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True, chain=False)
    request = Path(folder) / FLIGHT_RECORDER_REQUEST

    def wait_for_request():
        while not request.exists():
            time.sleep(1.0)
        dump_flight_recorder(Path(request.read_text().strip()), rank)

    threading.Thread(target=wait_for_request, name="flight-recorder-dump", daemon=True).start()


def dump_flight_recorder(out: Path, rank: int) -> Path | None:
    import torch

    try:
        from torch._C._distributed_c10d import _dump_fr_trace, _dump_nccl_trace
    except ImportError:
        return None
    dump = _dump_nccl_trace if torch.cuda.is_available() else _dump_fr_trace
    try:
        trace = dump()
    except Exception as exc:  # a recorder that was never on, a backend without one
        trace = pickle.dumps({"error": repr(exc)})
    # <prefix>_<rank> in a folder of its own: what the analyser (fr_trace) reads.
    path = out / FLIGHT_RECORDER_DIR / f"fr_trace_{rank}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, trace)
    return path


def record_exception(run_dir: str | Path, launch: str, rank: int, exc: BaseException, iteration: int | None) -> None:
    """Write the rank's failure record (never raises: the original exception must propagate)."""
    try:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        failure = RankFailure(
            rank=rank,
            node=socket.gethostname(),
            time=time.time(),
            exception=type(exc).__name__,
            message=str(exc)[:2000],
            where=where,
            traceback="".join(traceback.format_exception(exc))[-20000:],
            iteration=iteration,
        )
        write_rank_failure(run_dir, launch, failure)
    except Exception:
        pass
