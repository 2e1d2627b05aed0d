"""The watchdog beside the ranks: catches a hang, names the rank it hangs on, leaves its stacks in
the run folder and ends the launch so the launcher can recover.

A hung rank cannot report itself, and its peers only block in the next collective, where the
collective timeout (10 minutes by default, NCCL's or gloo's) ends them without saying who they
waited for. Each rank beats a heartbeat (formats/heartbeat.py: phase, stage, iteration, a sequence
number comparable across ranks, its median step time) into a node-local folder; the watchdog reads
them every ``resilience.hang_poll_s`` seconds. A rank whose last beat is older than its phase's
timeout has not advanced:

  setup   resilience.hang_setup_s, counted from the launch (imports, process groups, checkpoint load,
          data indexes); also a step before the rank has a median step time (the first steps pay
          for warm-up and lazy communicator set-up)
  step    max(hang_step_factor x the rank's median step time, hang_step_min_s), at most hang_step_max_s
  save    resilience.hang_save_s
  eval    resilience.hang_eval_s

Then it dumps every rank's Python stacks into ``${run_dir}/hangs/<launch>/`` (py-spy, which also
reads a stopped process; and faulthandler's, which each rank registered on SIGUSR2 at start, for
where py-spy may not attach), asks each rank for its collective trace (PyTorch's flight recorder,
on a thread of the rank: ``rank<N>.fr_trace``, readable with ``python -m
torch.distributed.flight_recorder.fr_trace``), writes its verdict (the stuck rank(s) and node(s):
those with the lowest heartbeat sequence number, i.e. the ones every other rank waits for, and any
stopped or in uninterruptible sleep; the phase, iteration and timeout) to
``${run_dir}/failures/<launch>/hang_verdict.json`` for the launcher, and kills the ranks (SIGKILL:
a hung rank answers nothing else). The launcher classifies the launch as ``hang`` (run/faults.py)
and recovers.

Across nodes (Slurm: one watchdog per node, ``python -m ellama_megatron.launch watchdog``) each
watchdog publishes its ranks' heartbeats and process states to
``${run_dir}/failures/<launch>/nodes/<node>.json``; the first node's is the judge: it reads them
all, decides, and writes ``dump_request`` then the verdict there; the others dump their ranks'
stacks on the request and kill their ranks on the verdict. Locally (recipes/cpt.py) one watchdog
runs as a thread of the launcher.

Megatron's collective timeout (--distributed-timeout-minutes) is set above the longest of these
timeouts (engine/megatron_args.py) so that the watchdog acts first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ellama_megatron.formats.atomic import write_json_atomic, write_text_atomic
from ellama_megatron.formats.heartbeat import FLIGHT_RECORDER_REQUEST, Heartbeat, read_heartbeats, stack_file
from ellama_megatron.run.faults import HANGS_DIR, VERDICT_FILE, Timeouts, failures_dir

DUMP_REQUEST = "dump_request"  # in failures/<launch>/: the judge asks every node for its ranks' stacks
SUSPECT_STATES = ("stopped", "tracing-stop", "disk-sleep", "zombie", "dead")  # psutil's names


@dataclass(frozen=True)
class RankView:
    """What a watchdog knows of one rank: its last heartbeat (None: none yet) and process state."""

    rank: int
    node: str
    beat: Heartbeat | None
    state: str | None  # psutil status of the process, read on its own node


def stalled(views: list[RankView], now: float, timeouts: Timeouts, watch_start: float) -> list[tuple[RankView, float]]:
    """(rank, its timeout) for each rank not advancing within its phase's timeout. A rank without a
    heartbeat is in set-up since the watchdog started."""
    out = []
    for v in views:
        if v.beat is None:
            if now - watch_start > timeouts.setup_s:
                out.append((v, timeouts.setup_s))
        elif now - v.beat.time > timeouts.of(v.beat):
            out.append((v, timeouts.of(v.beat)))
    return out


def stuck_ranks(views: list[RankView]) -> list[RankView]:
    """The ranks a hang is on: a process stopped or in uninterruptible sleep (or gone) is one for
    sure; otherwise the ranks furthest behind (lowest heartbeat sequence number, none at all lowest),
    which every other rank is waiting for in a collective."""
    suspect = [v for v in views if v.state in SUSPECT_STATES]
    if suspect:
        return suspect
    lowest = min((v.beat.seq if v.beat else 0) for v in views)
    return [v for v in views if (v.beat.seq if v.beat else 0) == lowest]


def verdict(views: list[RankView], late: list[tuple[RankView, float]], now: float, launch: str) -> dict:
    stuck = stuck_ranks(views)
    first = stuck[0].beat or (late[0][0].beat if late else None)
    phase = first.phase if first else "setup"
    iteration = first.iteration if first else 0
    described = ", ".join(
        f"rank {v.rank} on {v.node}" + (f" ({v.state})" if v.state in SUSPECT_STATES else "") for v in stuck
    )
    behind = [v for v in views if v not in stuck]
    waiting = f"; {len(behind)} other rank(s) waiting" if behind else ""
    if len(stuck) == len(views) and len(views) > 1:
        waiting = "; every rank is at the same point: the one at fault could not be told apart"
    timeout = max(t for _, t in late) if late else None
    return {
        "launch": launch,
        "time": now,
        "phase": phase,
        "stage": first.stage if first else None,
        "iteration": iteration,
        "timeout_s": timeout,
        "stuck": [
            {
                "rank": v.rank,
                "node": v.node,
                "state": v.state,
                "seq": v.beat.seq if v.beat else 0,
                "silent_s": round(now - v.beat.time, 1) if v.beat else None,
            }
            for v in stuck
        ],
        "summary": f"no progress in {phase} (iteration {iteration}) for over {timeout:.0f} s: {described}{waiting}",
    }


# -- the process side ------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "dead"
    except psutil.Error:
        return None


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def dump_stacks(beats: list[Heartbeat], heartbeat_dir: Path, out: Path) -> list[Path]:
    """Every local rank's stacks into ``out``: ``rank<N>.py-spy.txt`` (py-spy dump --nonblocking: it
    reads a stopped or busy process without its help) and ``rank<N>.faulthandler.txt`` (SIGUSR2 to
    the rank, whose faulthandler writes every thread's stack from the signal handler), plus the
    flight-recorder request to the ranks' dump thread."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    (heartbeat_dir / FLIGHT_RECORDER_REQUEST).write_text(str(out))
    spy = py_spy()
    for beat in beats:
        if spy:
            try:
                proc = subprocess.run(
                    [spy, "dump", "--nonblocking", "--pid", str(beat.pid)], capture_output=True, text=True, timeout=60
                )
                text = proc.stdout + (proc.stderr if proc.returncode else "")
            except (OSError, subprocess.TimeoutExpired) as exc:
                text = f"py-spy failed: {exc}"
            path = out / f"rank{beat.rank:05d}.py-spy.txt"
            write_text_atomic(path, text)
            written.append(path)
        try:
            os.kill(beat.pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
    time.sleep(2)  # faulthandler writes from the signal handler; the flight recorder from a thread
    for beat in beats:
        src = stack_file(heartbeat_dir, beat.rank)
        if src.exists() and src.stat().st_size:
            path = out / f"rank{beat.rank:05d}.faulthandler.txt"
            shutil.copyfile(src, path)
            written.append(path)
    return written


def pending_collectives(folder: Path) -> dict[str, list[str]]:
    """From the flight-recorder dumps in ``folder``: per rank, the collectives it entered and never
    finished ("all_reduce #68 of DATA_PARALLEL_GROUP_WITH_CP, 238208 elements"): where the ranks
    that could answer are waiting, for the rank that could not."""
    import pickle

    out = {}
    for path in sorted((folder / "flight_recorder").glob("fr_trace_*")):
        try:
            trace = pickle.loads(path.read_bytes())
            status, entries = trace["pg_status"], trace["entries"]
        except Exception:  # an error record, another version's layout
            continue
        waiting = []
        for pg_id, state in status.items():
            if state["last_enqueued_collective"] <= state["last_completed_collective"]:
                continue
            for e in reversed(entries):
                if str(e.get("pg_id")) == str(pg_id) and e["collective_seq_id"] > state["last_completed_collective"]:
                    size = sum(math.prod(s) for s in e.get("input_sizes") or [])
                    waiting.append(
                        f"{e['profiling_name']} #{e['collective_seq_id']} of {e['process_group'][1]}, {size} elements"
                    )
                    break
        out[path.name.rsplit("_", 1)[1]] = waiting
    return out


def kill_ranks(beats: list[Heartbeat]) -> None:
    for beat in beats:
        try:
            os.kill(beat.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- one node's watchdog -----------------------------------------------------------------------------


class Watchdog:
    """One node's watchdog; the judge decides for the whole launch (the only one when ``nodes`` is 1)."""

    def __init__(
        self,
        run_dir: str | Path,
        heartbeat_dir: str | Path,
        launch: str,
        timeouts: Timeouts,
        node: str,
        local_ranks: int,
        judge: bool = True,
        nodes: int = 1,
        log=print,
    ):
        self.run_dir, self.heartbeat_dir = Path(run_dir), Path(heartbeat_dir)
        self.launch, self.timeouts, self.node = launch, timeouts, node
        self.local_ranks, self.judge, self.nodes, self.log = local_ranks, judge, nodes, log
        self.shared = failures_dir(self.run_dir, launch)
        self.start = time.time()
        self.dumped = False
        self.result: dict | None = None  # the verdict, once there is one

    def local_views(self) -> tuple[list[RankView], list[Heartbeat]]:
        beats = read_heartbeats(self.heartbeat_dir)
        views = [RankView(b.rank, b.node, b, process_state(b.pid)) for b in beats.values()]
        return views, list(beats.values())

    def publish(self, views: list[RankView]) -> None:
        path = self.shared / "nodes" / f"{self.node}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path,
            {
                "node": self.node,
                "time": time.time(),
                "ranks": [
                    {"beat": asdict(v.beat) if v.beat else None, "state": v.state, "rank": v.rank} for v in views
                ],
            },
        )

    def all_views(self, local: list[RankView]) -> list[RankView]:
        views = {v.rank: v for v in local}
        for path in (self.shared / "nodes").glob("*.json") if self.nodes > 1 else []:
            if path.stem == self.node:
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for r in record["ranks"]:
                beat = Heartbeat(**r["beat"]) if r["beat"] else None
                views.setdefault(r["rank"], RankView(r["rank"], record["node"], beat, r["state"]))
        return sorted(views.values(), key=lambda v: v.rank)

    def poll(self) -> dict | None:
        """One look; returns the verdict when this poll found (judge) or obeyed (others) a hang."""
        views, beats = self.local_views()
        if self.nodes > 1:
            self.publish(views)
        if not self.judge:
            if (self.shared / DUMP_REQUEST).exists() and not self.dumped:
                self.dumped = True
                dump_stacks(beats, self.heartbeat_dir, self.run_dir / HANGS_DIR / self.launch)
            if (self.shared / VERDICT_FILE).exists():
                kill_ranks(beats)
                self.result = json.loads((self.shared / VERDICT_FILE).read_text())
            return self.result
        everyone = self.all_views(views)
        now = time.time()
        late = stalled(everyone, now, self.timeouts, self.start)
        if not late:
            return None
        found = verdict(everyone, late, now, self.launch)
        self.log(f"watchdog: hang: {found['summary']}; dumping stacks to {self.run_dir / HANGS_DIR / self.launch}")
        self.shared.mkdir(parents=True, exist_ok=True)
        (self.shared / DUMP_REQUEST).write_text(str(now))
        dumps = dump_stacks(beats, self.heartbeat_dir, self.run_dir / HANGS_DIR / self.launch)
        if self.nodes > 1:
            time.sleep(min(60.0, 10.0 + 2 * len(beats)))  # the other nodes dump theirs on the request
        found["stacks"] = str(self.run_dir / HANGS_DIR / self.launch)
        found["stack_files"] = len(dumps)
        found["waiting_in"] = pending_collectives(self.run_dir / HANGS_DIR / self.launch)
        waits = "; ".join(f"rank {r} in {', '.join(w)}" for r, w in found["waiting_in"].items() if w)
        if waits:
            found["summary"] += f"; waiting: {waits}"
        found["detected_after_s"] = round(now - max((v.beat.time for v, _ in late if v.beat), default=self.start), 1)
        write_json_atomic(self.shared / VERDICT_FILE, found)
        kill_ranks(beats)
        self.result = found
        return found

    def ranks_gone(self) -> bool:
        """Every local rank has beaten once and no longer runs (the launch ended by itself)."""
        beats = read_heartbeats(self.heartbeat_dir)
        if len(beats) < self.local_ranks:
            return False
        return all(process_state(b.pid) in ("dead", "zombie") for b in beats.values())

    def run(self, poll_s: float, stop=None) -> dict | None:
        """Poll until a verdict, until the ranks are gone, or until ``stop()`` is true."""
        while not (stop and stop()):
            found = self.poll()
            if found is not None:
                return found
            if self.ranks_gone():
                return None
            time.sleep(poll_s)
        return None


def watch_node(config: Path, local_ranks: int, env=os.environ) -> int:
    """``python -m ellama_megatron.launch watchdog``: this node's watchdog in a Slurm job step (one
    task per node, started by slurm/launch.sh beside the ranks' step); the first node judges."""
    import socket

    from omegaconf import OmegaConf

    from ellama_megatron.formats.heartbeat import HEARTBEAT_DIR_ENV
    from ellama_megatron.formats.timeline import LAUNCH_ID_ENV

    cfg = OmegaConf.load(config)
    folder = Path(env[HEARTBEAT_DIR_ENV])
    watchdog = Watchdog(
        Path(config).parent,
        folder,
        env[LAUNCH_ID_ENV],
        Timeouts.from_config(cfg.resilience),
        socket.gethostname(),
        local_ranks,
        judge=env.get("SLURM_NODEID", "0") == "0",
        nodes=int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1),
        log=lambda m: print(f"[watchdog {socket.gethostname()} {time.strftime('%H:%M:%S')}] {m}", flush=True),
    )
    try:
        watchdog.run(float(cfg.resilience.hang_poll_s))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0
