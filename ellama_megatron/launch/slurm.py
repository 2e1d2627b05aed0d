"""The decisions of a Slurm job (slurm/launch.sh): how many ranks, how long until the time limit,
which config, and after the ranks exit whether to requeue. The shell keeps only what must be
shell (srun, the signal trap, the wait) and asks ``python -m ellama_megatron.launch`` the rest.

A job is requeued when it stopped early (a time-limit or preemption signal, or Megatron's own exit
before the time limit) and can go on: not when the run is finished (done.json, or the last
checkpoint at the budget's iteration), not when the ranks failed without a signal, not when they
exited cleanly without progress (that would loop), not past ELLAMA_MAX_REQUEUES.

Megatron's rerun state machine has two exits of its own: 16 (a rejected result reproduced on this
GPU; it saved the model from before the step and must rerun on another) is requeued with the node
excluded, at most ELLAMA_MAX_RERUNS_ELSEWHERE times per run; 17 (the result was diagnosed) stops the
job with a report, unless resilience.spike_policy is skip or rollback and the result reproduced on
the other node (bad data): then the job is requeued to go on past it (run/recovery.py). All are
appended to ${run_dir}/events.jsonl.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from ellama_megatron.launch.prepare import CONFIG_FILE, prepare_plan
from ellama_megatron.launch.run_lock import RunLockedError
from ellama_megatron.run.events import (
    EXIT_RERUN_ELSEWHERE,
    EXIT_RESULT_REJECTED,
    append_event,
    describe,
    exit_report,
    read_events,
    take_rank_exit,
)
from ellama_megatron.run.plan import RunPlan
from ellama_megatron.run.progress import is_finished, saved_iteration
from ellama_megatron.run.recovery import after_rejection
from ellama_megatron.run.schema import ConfigError

DEFAULT_EXIT_MARGIN_MIN = 10  # minutes kept free before the time limit for the final checkpoint
DEFAULT_MAX_REQUEUES = 500  # a month of 4-hour slots is ~180
DEFAULT_MAX_RERUNS_ELSEWHERE = 3  # exit-16 requeues per run: more means the fault is not one node's
REQUEUE_LOG = "requeues.txt"  # in the job's log folder: one line per requeue


def log(message: str) -> None:
    """A line of the job's log, as slurm/launch.sh writes its own (stderr: stdout carries the shell's variables)."""
    print(f"[launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the allocation ------------------------------------------------------------------------------


def header_value(sbatch_file: Path, option: str) -> int | None:
    """The number of ``#SBATCH --option=N`` in the batch script's header."""
    match = re.search(rf"^#SBATCH --{re.escape(option)}=(\d+)", Path(sbatch_file).read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def allocation(sbatch_file: Path, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Nodes and ranks per node: from the job's allocation, or from the #SBATCH header outside Slurm
    (a dry run)."""
    if env.get("SLURM_JOB_ID"):
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE") or str(int(env.get("SLURM_NTASKS") or 1) // nodes)
        return nodes, int(per_node.split("(")[0])  # Slurm writes "8(x60)" for 8 on each of 60 nodes
    return header_value(sbatch_file, "nodes") or 1, header_value(sbatch_file, "ntasks-per-node") or 1


def layout_overrides(sbatch_file: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    nodes, per_node = allocation(sbatch_file, env)
    return [f"cluster.nodes={nodes}", f"cluster.procs_per_node={per_node}"]


def minutes_left(squeue_time: str) -> int | None:
    """squeue's %L ([days-][hours:]minutes:seconds) in whole minutes; None for UNLIMITED or junk."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", squeue_time.strip())
    if not match:
        return None
    days, hours, minutes, _ = (int(g or 0) for g in match.groups())
    return days * 1440 + hours * 60 + minutes


def job_minutes_left(job_id: str) -> int | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return minutes_left(out.splitlines()[0]) if out.strip() else None


def exit_duration_overrides(job_id: str, margin_min: int) -> list[str]:
    """Stop a little before the time limit by Megatron's own clock, so the checkpoint is written
    before the USR1 signal is even needed."""
    left = job_minutes_left(job_id)
    if left is None or left - margin_min <= 0:
        return []
    return [f"train.exit_duration_in_mins={left - margin_min}"]


# -- preparing the job ---------------------------------------------------------------------------


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("ellama_megatron.conf", version_base=None):
        return hydra_compose("config", overrides=overrides)


def job_overrides(sbatch_file: Path, preset: list[str], user: list[str], env: Mapping[str, str]) -> list[str]:
    """Everything the job's config is composed from, in this order: the run folder per job (so that
    requeues share it) unless the user named one, the sbatch preset, the allocation, the time limit,
    and the user's own overrides last."""
    job_id = env["SLURM_JOB_ID"]
    default_run = (
        []
        if any(o.startswith(("run_dir=", "run_name=")) for o in user)
        else [f"run_dir=runs/{env.get('SLURM_JOB_NAME', 'ellama')}-{job_id}"]
    )
    margin = int(env.get("ELLAMA_EXIT_MARGIN_MIN") or DEFAULT_EXIT_MARGIN_MIN)
    return [
        "launch=none",
        *default_run,
        *preset,
        *layout_overrides(sbatch_file, env),
        *exit_duration_overrides(job_id, margin),
        *user,
    ]


def job_log_dir(env: Mapping[str, str]) -> Path:
    root = Path(env.get("ELLAMA_LOG_ROOT") or "slurm/logs")
    return root / f"{env.get('SLURM_JOB_NAME', 'ellama')}-{env['SLURM_JOB_ID']}"


def prepare_job(
    sbatch_file: Path, preset: list[str], user: list[str], env: Mapping[str, str] = os.environ
) -> tuple[int, dict]:
    """Compose, check and record the job's config; returns (exit status, shell variables).

    Status 2: the config is invalid (not started, not requeued). The variables say what to start:
    ELLAMA_CONFIG, RUN_DIR, NODES, PROCS_PER_NODE, JOB_LOG_DIR, START_ITER; FINISHED=1 when the run
    had already spent its budget (nothing to do)."""
    if not env.get("SLURM_JOB_ID"):
        log("not inside a Slurm job; submit with sbatch (or set ELLAMA_DRY_RUN=1)")
        return 2, {}
    restart = env.get("SLURM_RESTART_COUNT", "0")
    nodes, per_node = allocation(sbatch_file, env)
    log(f"job {env['SLURM_JOB_ID']} restart {restart}: {nodes} nodes x {per_node} ranks")
    try:
        cfg = compose(job_overrides(sbatch_file, preset, user, env))
        plan = prepare_plan(cfg)
    except RunLockedError as exc:
        log(f"{exc}\nnot starting, not requeueing")
        return 2, {}
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        log(f"config invalid: {exc}\nnot starting, not requeueing")
        return 2, {}
    except Exception as exc:  # Hydra's own errors name the override that failed
        log(f"config invalid ({type(exc).__name__}): {exc}\nnot starting, not requeueing")
        return 2, {}
    for line in plan.summary_lines():
        log(line)
    run_dir = Path(cfg.run_dir)
    config = run_dir / CONFIG_FILE
    log_dir = job_log_dir(env)
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, log_dir / f"config.restart{restart}.yaml")
    (log_dir / "run_dir").write_text(f"{run_dir}\n")
    start = saved_iteration(run_dir)
    variables = {
        "ELLAMA_CONFIG": config,
        "RUN_DIR": run_dir,
        "NODES": nodes,
        "PROCS_PER_NODE": per_node,
        "JOB_LOG_DIR": log_dir,
        "START_ITER": start,
    }
    if is_finished(run_dir, plan.train_iterations):
        log(f"run already finished (iteration {start} of {plan.train_iterations}); nothing to do")
        variables["FINISHED"] = 1
    return 0, variables


def shell_assignments(variables: dict) -> str:
    return "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in variables.items())


# -- after the ranks -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    exit_code: int  # the job's exit status when not requeued (0 after a requeue)
    reason: str
    exclude_node: bool = False  # requeue away from the node the ranks ran on (exit 16)


def requeue_decision(
    *,
    finished: bool,
    signalled: bool,
    exit_code: int,
    start_iteration: int,
    end_iteration: int,
    train_iterations: int,
    restart: int,
    max_requeues: int,
    reruns_elsewhere: int = 0,
    max_reruns_elsewhere: int = DEFAULT_MAX_RERUNS_ELSEWHERE,
) -> RequeueDecision:
    """Whether a job whose ranks have exited goes on in a requeued job (the rules in the module docstring)."""
    if finished:
        return RequeueDecision(
            False, 0, f"run finished (iteration {end_iteration} of {train_iterations}): not requeueing"
        )
    if exit_code == EXIT_RESULT_REJECTED:
        return RequeueDecision(
            False,
            exit_code,
            "Megatron rejected a result and diagnosed it (exit 17): stopping, "
            "not requeueing; see events.jsonl and result_rejected.txt in the run folder",
        )
    if exit_code == EXIT_RERUN_ELSEWHERE:
        if reruns_elsewhere >= max_reruns_elsewhere:
            return RequeueDecision(
                False,
                exit_code,
                f"exit 16 again after {reruns_elsewhere} reruns on other nodes "
                f"(ELLAMA_MAX_RERUNS_ELSEWHERE={max_reruns_elsewhere}): not requeueing",
            )
        if restart >= max_requeues:
            return RequeueDecision(
                False, exit_code, f"requeue cap ELLAMA_MAX_REQUEUES={max_requeues} reached: not requeueing"
            )
        return RequeueDecision(
            True,
            0,
            f"exit 16: requeueing (restart {restart + 1}) without this node, to rerun "
            f"iteration {end_iteration + 1} elsewhere",
            exclude_node=True,
        )
    if not signalled and exit_code != 0:
        return RequeueDecision(
            False,
            exit_code,
            f"ranks failed (exit {exit_code}) without a preemption or time-limit signal: not requeueing",
        )
    if not signalled and end_iteration <= start_iteration:
        return RequeueDecision(False, 3, "ranks exited cleanly but made no progress: not requeueing (would loop)")
    if restart >= max_requeues:
        return RequeueDecision(False, 4, f"requeue cap ELLAMA_MAX_REQUEUES={max_requeues} reached: not requeueing")
    return RequeueDecision(True, 0, f"requeueing (restart {restart + 1}) to resume from iteration {end_iteration}")


def decide_for_run(
    config: Path, *, signalled: bool, exit_code: int, start_iteration: int, env: Mapping[str, str] = os.environ
) -> RequeueDecision:
    """requeue_decision for the run recorded in ``config`` (its run folder's progress)."""
    plan = RunPlan.from_cfg(OmegaConf.load(config))
    run_dir = Path(config).parent
    return requeue_decision(
        finished=is_finished(run_dir, plan.train_iterations),
        signalled=signalled,
        exit_code=exit_code,
        start_iteration=start_iteration,
        end_iteration=saved_iteration(run_dir),
        train_iterations=plan.train_iterations,
        restart=int(env.get("SLURM_RESTART_COUNT") or 0),
        max_requeues=int(env.get("ELLAMA_MAX_REQUEUES") or DEFAULT_MAX_REQUEUES),
        reruns_elsewhere=sum(
            e["kind"] == "rerun_elsewhere" and e["action"].startswith("requeue") for e in read_events(run_dir)
        ),
        max_reruns_elsewhere=int(env.get("ELLAMA_MAX_RERUNS_ELSEWHERE") or DEFAULT_MAX_RERUNS_ELSEWHERE),
    )


def excluded_nodes(run_dir: Path) -> list[str]:
    """Every node an exit-16 requeue of this run has excluded so far."""
    return sorted({e["node"] for e in read_events(run_dir) if e.get("excluded") and e.get("node")})


def end_job(
    config: Path,
    signal_name: str,
    exit_code: int,
    start_iteration: int,
    log_dir: Path,
    env: Mapping[str, str] = os.environ,
) -> int:
    """After the ranks: log what they did, requeue the job when it should go on; returns the job's exit status."""
    run_dir = Path(config).parent
    end = saved_iteration(run_dir)
    exit_code = take_rank_exit(run_dir, exit_code)
    log(f"ranks exited with {exit_code}; checkpoint iteration {start_iteration} -> {end}")
    resilience = OmegaConf.load(config).resilience
    if exit_code == EXIT_RESULT_REJECTED and resilience.spike_policy != "stop":
        # 17 after the rerun on another node (an exit-16 requeue): a result that reproduced there is the
        # data's, and skip/rollback set the save folder up for the next launch (run/recovery.py).
        if not after_rejection(run_dir, resilience, exit_code):
            return exit_code
        log(f"requeueing job {env['SLURM_JOB_ID']} to go on after the {resilience.spike_policy}")
        return subprocess.call(["scontrol", "requeue", env["SLURM_JOB_ID"]])
    decision = decide_for_run(
        config, signalled=bool(signal_name), exit_code=exit_code, start_iteration=start_iteration, env=env
    )
    report = exit_report(run_dir, exit_code)
    if report:
        log(describe(report))
        action = (
            "requeue excluding the node" if decision.exclude_node and decision.requeue else "stop: " + decision.reason
        )
        append_event(
            run_dir,
            **{k: v for k, v in report.items() if k != "kind"},
            kind=report["kind"],
            action=action,
            job=env.get("SLURM_JOB_ID"),
            excluded=decision.exclude_node and decision.requeue,
        )
    if not decision.requeue:
        log(decision.reason)
        return decision.exit_code
    job_id, restart = env["SLURM_JOB_ID"], int(env.get("SLURM_RESTART_COUNT") or 0)
    log(f"requeueing job {job_id} (restart {restart + 1}) to resume from iteration {end}")
    with open(Path(log_dir) / REQUEUE_LOG, "a") as f:
        f.write(f"restart {restart}: {start_iteration} -> {end}, signal {signal_name or 'none'}, exit {exit_code}\n")
    if not decision.exclude_node:
        return subprocess.call(["scontrol", "requeue", job_id])
    # Slurm takes an ExcNodeList only from a pending job ("Job is no longer pending execution" while
    # it runs), and a requeued job is pending (while completing) at once: requeue, then exclude. The
    # requeue SIGTERMs this batch job within KillWait; ignored here (and by scontrol, which inherits
    # it) so that the exclusion is still set. The job cannot start before it has completed, so it
    # never starts without the exclusion.
    handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        status = subprocess.call(["scontrol", "requeue", job_id])
        if status != 0:
            return status
        nodes = ",".join(excluded_nodes(run_dir))
        log(f"excluding nodes {nodes} from job {job_id}")
        if subprocess.call(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={nodes}"]) != 0:
            log(
                "scontrol could not set the exclusion on the requeued job; it may land on the same node (then "
                "Megatron exits 16 again, within ELLAMA_MAX_RERUNS_ELSEWHERE)"
            )
        return 0
    finally:
        signal.signal(signal.SIGTERM, handler)
