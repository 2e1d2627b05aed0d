"""recipes/cpt.py's launch: prepare the run, print its plan, then start the ranks on this machine
with torchrun (launch=torchrun) or stop with the config's path for srun (launch=none).

The local launch recovers as the Slurm one does (run/faults.py), on one machine: a watchdog thread
beside torchrun reads the ranks' heartbeats and ends a hang (launch/watchdog.py); after a crash,
a hang or a dead rank the ranks are started again from the newest complete checkpoint, within the
retry rules; Megatron's exit 16/17 goes to resilience.spike_policy (run/recovery.py). Every
launch's start and end are events in ${run_dir}/events.jsonl.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from ellama_megatron.formats.heartbeat import HEARTBEAT_DIR_ENV
from ellama_megatron.formats.timeline import LAUNCH_ID_ENV
from ellama_megatron.launch.finish import export_finished_run
from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.launch.watchdog import Watchdog
from ellama_megatron.run.events import append_event, read_events, take_rank_exit
from ellama_megatron.run.faults import (
    BAD_DATA,
    Decision,
    LaunchEnd,
    Timeouts,
    classify,
    decide,
    end_event,
    hardware_lines,
    read_rank_failures,
    read_verdict,
    task_failures_from_torchrun,
)
from ellama_megatron.run.progress import is_finished, saved_iteration
from ellama_megatron.run.recovery import after_rejection
from ellama_megatron.run.schema import ConfigError
from ellama_megatron.runtime.parent_death import die_with_parent

RANK_MODULE = "ellama_megatron.engine.train"  # one rank of the engine, however it is started
OUTPUT_TAIL_LINES = 4000  # of torchrun's stderr, kept to classify a failure (its summary, NCCL lines)


def torchrun_command(procs_per_node: int, config_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(procs_per_node),
        "-m",
        RANK_MODULE,
        "--config",
        str(config_path),
    ]


def heartbeat_folder(launch: str) -> Path:
    """Node-local (tmpfs where there is one): the ranks write it at every step."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return root / f"ellama-heartbeats-{os.getuid()}-{launch}"


def run_recipe(cfg) -> int:
    """What recipes/cpt.py does; returns the process exit code."""
    try:
        plan = prepare_plan(cfg)  # holds the run folder's lock from here to this process's exit
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config_path = Path(cfg.run_dir) / CONFIG_FILE
    for line in plan.summary_lines():
        print(line)
    if is_finished(cfg.run_dir, plan.train_iterations):
        # Megatron would start, find no samples left and fail an assertion: nothing to do is success.
        print(
            f"run already finished (iteration {saved_iteration(cfg.run_dir)} of {plan.train_iterations} in "
            f"{cfg.run_dir}); nothing started"
        )
        return finish(cfg)
    if os.environ.get("ELLAMA_DRY_RUN"):
        from ellama_megatron.engine.lr_schedule import format_lr_curve

        print(format_lr_curve(cfg))
        print(f"dry run: config written to {config_path}; nothing started")
        return 0
    if cfg.launch == "none":
        print(f"ELLAMA_CONFIG={config_path}")
        return 0
    if plan.nodes != 1:
        print("error: launch=torchrun starts one node; use slurm/*.sbatch for several", file=sys.stderr)
        return 2
    take_rank_exit(cfg.run_dir, 0)  # a record a killed launch left behind is not this launch's
    while True:
        code, go_on = launch_once(cfg, plan.procs_per_node, config_path, plan.train_iterations)
        if not go_on:
            return code or (finish(cfg) if is_finished(cfg.run_dir, plan.train_iterations) else 0)


def finish(cfg) -> int:
    """The finished run's export (checkpoint.export_hf); 1 when it fails, with the reason."""
    try:
        export_finished_run(cfg)
    except Exception as exc:  # the run is done; its export can be redone by launching again
        print(f"error: checkpoint.export_hf: {exc}; launch again to retry the export", file=sys.stderr)
        return 1
    return 0


def launch_once(cfg, procs_per_node: int, config_path: Path, train_iterations: int) -> tuple[int, bool]:
    """One torchrun with its watchdog; returns (exit code, whether to launch again)."""
    run_dir = Path(cfg.run_dir)
    launch = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    start = saved_iteration(run_dir)
    folder = heartbeat_folder(launch)
    folder.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname()
    append_event(
        run_dir,
        "launch",
        iteration=start,
        node=node,
        action="start",
        launch=launch,
        nodes=[node],
        ranks=procs_per_node,
        start_iteration=start,
    )
    env = {**os.environ, LAUNCH_ID_ENV: launch, HEARTBEAT_DIR_ENV: str(folder)}
    # torchrun dies with this process (SIGTERM: it stops its ranks); the ranks arm the same for themselves.
    proc = subprocess.Popen(
        torchrun_command(procs_per_node, config_path),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    copier = threading.Thread(target=_copy_stderr, args=(proc, tail), daemon=True)
    copier.start()
    done = threading.Event()
    watchdog = None
    if cfg.resilience.hang_detection:
        watchdog = Watchdog(
            run_dir,
            folder,
            launch,
            Timeouts.from_config(cfg.resilience),
            node,
            procs_per_node,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        threading.Thread(
            target=watchdog.run, args=(float(cfg.resilience.hang_poll_s), done.is_set), daemon=True
        ).start()
    code = proc.wait()
    done.set()
    copier.join(timeout=10)
    shutil.rmtree(folder, ignore_errors=True)
    code = take_rank_exit(run_dir, code)
    # Megatron's exit 16/17 (a rejected loss): logged and reported; resilience.spike_policy says
    # whether the run goes on (the ranks read the iterations to skip from events.jsonl).
    if code in (16, 17):
        return code, after_rejection(run_dir, cfg.resilience, code, launch=launch, start_iteration=start)
    output = "".join(tail)
    end = LaunchEnd(
        launch=launch,
        signal=None,
        exit_code=code,
        start_iteration=start,
        end_iteration=saved_iteration(run_dir),
        finished=is_finished(run_dir, train_iterations) and code == 0,
        # torchrun --standalone calls the machine "localhost"; the heartbeats and events use its name.
        task_failures=[replace(t, node=node) for t in task_failures_from_torchrun(output)],
        rank_failures=read_rank_failures(run_dir, launch),
        hardware_lines=hardware_lines(output),
        verdict=read_verdict(run_dir, launch),
    )
    return record_and_decide(run_dir, cfg.resilience, end)


def record_and_decide(run_dir: Path, resilience, end: LaunchEnd) -> tuple[int, bool]:
    """Classify the launch's end, append its event, say what happens next (one machine: nothing to
    exclude)."""
    fault = classify(end)
    if fault.kind in ("time_limit", "preempted"):
        # On one machine a clean stop is asked for (train.exit_interval, exit_duration_in_mins, a
        # signal from the user): not a fault to recover from.
        decision = Decision(
            False, fault.kind, end.exit_code, f"stopped at iteration {end.end_iteration}: launch again to go on"
        )
    else:
        decision = decide(fault, end, read_events(run_dir), resilience, excluded=None, verb="relaunch")
    append_event(run_dir, **end_event(fault, end, decision, "relaunch"))
    if decision.kind == "suspected_bug" and fault.traceback:
        print(f"error: {decision.reason}\n{fault.traceback}", file=sys.stderr, flush=True)
    elif not decision.go_on and decision.kind != "finished":
        print(f"error: {decision.reason}", file=sys.stderr, flush=True)
    elif decision.go_on:
        print(f"warning: {decision.reason}", file=sys.stderr, flush=True)
    return decision.exit_code, decision.go_on


def _copy_stderr(proc: subprocess.Popen, tail: deque) -> None:
    """The ranks' and torchrun's stderr, shown as it comes, until a rank stops on bad data: its line
    is the one the launcher prints at the end (record_and_decide), and what follows (its peers'
    tracebacks from the collective it left, torchrun's failure report) says nothing more."""
    quiet = False
    for line in proc.stderr:
        quiet = quiet or f"error: {BAD_DATA}: " in line
        if not quiet:
            sys.stderr.write(line)
        tail.append(line)
    sys.stderr.flush()
