"""One point of a Hydra multirun sweep on Slurm (recipes/sweep.py through hydra-submitit-launcher):
each submitit task is one rank, as under slurm/launch.sh's srun.

Rank 0 prepares the point (the same checks and record as every launch) and writes point.json; the
other ranks wait for it. Each rank runs the engine in its own process; on submitit's time-limit or
preemption signal the engine first saves and exits (SIGTERM: Megatron's exit-signal handler), then
the Slurm launcher's requeue decision (launch/slurm.py) says whether submitit requeues the point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ellama_megatron.formats.atomic import write_json_atomic
from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.launch.slurm import decide_for_run
from ellama_megatron.launch.torchrun import RANK_MODULE
from ellama_megatron.run.progress import saved_iteration
from ellama_megatron.run.schema import ConfigError
from ellama_megatron.sweep.table import POINT_FILE

PREPARE_TIMEOUT_S = 600  # how long ranks > 0 wait for rank 0 to check and write the config


def prepare_point(cfg, job, hc, restart: str) -> Path:
    """Rank 0 checks and writes the point's config and point.json; the other ranks wait for it.

    point.json names this attempt (job id, restart count), so that no rank reads a stale one."""
    point_file = Path(cfg.run_dir) / POINT_FILE
    attempt = {"job_id": job.job_id, "restart": restart}
    if job.global_rank == 0:
        point = {"num": hc.job.num, "overrides": list(hc.overrides.task), "log_dir": str(job.paths.folder), **attempt}
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        try:
            plan = prepare_plan(cfg)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            write_json_atomic(point_file, {**point, "error": str(exc)})  # the other ranks stop too
            # An exception, not SystemExit: submitit records it, and the driver reports the point failed.
            raise ConfigError(f"point {hc.job.num} ({' '.join(hc.overrides.task)}): {exc}") from None
        for line in plan.summary_lines():
            print(line, flush=True)
        config_path = Path(cfg.run_dir) / CONFIG_FILE
        write_json_atomic(point_file, {**point, "config": str(config_path)})
        return config_path
    deadline = time.monotonic() + PREPARE_TIMEOUT_S
    while time.monotonic() < deadline:
        if point_file.exists():
            point = json.loads(point_file.read_text())
            if {k: point.get(k) for k in attempt} == attempt:
                if "error" in point:
                    raise ConfigError(f"rank {job.global_rank}: rank 0 refused the point: {point['error']}")
                return Path(point["config"])
        time.sleep(0.5)
    raise TimeoutError(f"rank {job.global_rank}: rank 0 did not write {point_file} in {PREPARE_TIMEOUT_S} s")


def requeue_signal() -> signal.Signals:
    """The signal submitit requeues on (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    import submitit

    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def run_rank(config_path: Path, job) -> int:
    """Run this rank's engine in its own process (Megatron's globals, argv and exits stay out of
    Hydra and submitit); returns its exit status, unless submitit requeues the point first."""
    start = saved_iteration(config_path.parent)
    sig = requeue_signal()
    submitit_requeue = signal.getsignal(sig)  # submitit's handler: rank 0 requeues the job and exits
    # Slurm sends the signal to every process of the step: the engine must not die of it.
    proc = subprocess.Popen(
        [sys.executable, "-m", RANK_MODULE, "--config", str(config_path)],
        preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN),
    )
    caught: list[int] = []

    def save_and_exit(signum, frame):
        caught.append(signum)
        print(
            f"rank {job.global_rank}: got {signal.Signals(signum).name}: the engine checkpoints and exits, "
            "then the point is requeued",
            flush=True,
        )
        proc.send_signal(signal.SIGTERM)

    signal.signal(sig, save_and_exit)
    # Poll, not wait(): a handler arriving inside wait() could not wait for the process itself.
    while proc.poll() is None:
        time.sleep(0.5)
    if not caught:
        return proc.returncode
    # submitit's signal comes before the time limit (and on preemption): a time limit for the run.
    decision = decide_for_run(config_path, signal_name="USR1", exit_code=proc.returncode, start_iteration=start)
    print(f"rank {job.global_rank}: {decision.reason}", flush=True)
    if decision.go_on and callable(submitit_requeue):
        submitit_requeue(caught[0], None)  # rank 0 requeues the job and exits; other ranks return
    return decision.exit_code


def run_point(cfg, hc) -> None:
    """The body of recipes/sweep.py's task: prepare this point, then run this rank of it."""
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError as exc:
        sys.exit(
            f"recipes/sweep.py: not inside a submitit job ({exc}); "
            "use hydra/launcher=slurm_h100, slurm_cpu or submitit_local "
            "(one machine, e.g. hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2)"
        )
    cfg.run_dir = str(Path(hc.sweep.dir) / hc.sweep.subdir)
    cfg.launch = "none"
    cfg.cluster.nodes = job.num_nodes
    cfg.cluster.procs_per_node = job.num_tasks // job.num_nodes
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    config_path = prepare_point(cfg, job, hc, restart)
    # This task is one rank (as under slurm/launch.sh's srun): rendezvous from the allocation.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code = run_rank(config_path, job)
    if code:
        raise RuntimeError(f"point {hc.job.num}: rank {job.global_rank} exited with {code}")
