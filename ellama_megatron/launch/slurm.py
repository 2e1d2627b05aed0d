"""The decisions of a Slurm job (slurm/launch.sh): how many ranks, how long until the time limit,
which config, and after the ranks exit whether to requeue. The shell keeps only what must be
shell (srun, the signal trap, the wait) and asks ``python -m ellama_megatron.launch`` the rest.

After the ranks, the launch's end is classified and decided by run/faults.py: a time-limit or
preemption signal, or Megatron's own exit before the time limit, is requeued; so is a failure (a
crash, a dead node, a hang the watchdog ended) while the run makes progress, with the node it points
at excluded at once when it looks like hardware and otherwise when failures repeat there; the same
failure at the same checkpoint resilience.max_same_failure times stops as a suspected bug. Never
requeued: a finished run (done.json, or the last checkpoint at the budget's iteration), a clean
exit without progress (that would loop), past ELLAMA_MAX_REQUEUES.

Megatron's rerun state machine has two exits of its own: 16 (a rejected result reproduced on this
GPU; it saved the model from before the step and must rerun on another) is requeued with the node
excluded, at most ELLAMA_MAX_RERUNS_ELSEWHERE times per run; 17 (the result was diagnosed) stops the
job with a report, unless resilience.spike_policy is skip or rollback and the result reproduced on
the other node (bad data): then the job is requeued to go on past it (run/recovery.py). All are
appended to ${run_dir}/events.jsonl.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from ellama_megatron.formats.train_log import job_start_message, launcher_line, requeue_message
from ellama_megatron.launch.finish import export_finished_run
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
from ellama_megatron.run.faults import (
    Decision,
    LaunchEnd,
    classify,
    decide,
    end_event,
    hardware_lines,
    read_rank_failures,
    read_verdict,
    task_failures_from_srun,
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
    print(launcher_line(message), file=sys.stderr, flush=True)


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
    log(job_start_message(env["SLURM_JOB_ID"], restart, nodes, per_node))
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
    launch = launch_id(env)
    variables = {
        "ELLAMA_CONFIG": config,
        "RUN_DIR": run_dir,
        "NODES": nodes,
        "PROCS_PER_NODE": per_node,
        "JOB_LOG_DIR": log_dir,
        "START_ITER": start,
        "LAUNCH_ID": launch,
        "HEARTBEAT_DIR": heartbeat_folder(launch, env),
        "RANK_STDERR": rank_stderr(log_dir, env),
    }
    if cfg.resilience.hang_detection:
        variables["HANG_DETECTION"] = 1
    if is_finished(run_dir, plan.train_iterations):
        log(f"run already finished (iteration {start} of {plan.train_iterations}); nothing to do")
        variables["FINISHED"] = 1
        if not export_after_finish(cfg):
            return 1, variables
    else:
        append_event(
            run_dir,
            "launch",
            iteration=start,
            node=None,
            action="start",
            launch=launch,
            start_iteration=start,
            nodes=env.get("SLURM_JOB_NODELIST"),
            ranks=nodes * per_node,
            job=env["SLURM_JOB_ID"],
            restart=int(restart),
        )
    return 0, variables


def launch_id(env: Mapping[str, str]) -> str:
    """One launch of the run: the job and its restart (a requeued job keeps its id)."""
    return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT') or 0}"


def heartbeat_folder(launch: str, env: Mapping[str, str]) -> Path:
    """Node-local: the same path on every node, each node's ranks and watchdog use their own."""
    return Path(env.get("ELLAMA_HEARTBEAT_ROOT") or "/dev/shm") / f"ellama-heartbeats-{os.getuid()}-{launch}"


def rank_stderr(log_dir: Path, env: Mapping[str, str]) -> Path:
    """Where slurm/launch.sh copies the ranks' stderr and srun's own messages (a failure's evidence)."""
    return Path(log_dir) / f"ranks.restart{env.get('SLURM_RESTART_COUNT') or 0}.err"


def shell_assignments(variables: dict) -> str:
    return "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in variables.items())


# -- after the ranks -----------------------------------------------------------------------------


def decide_for_run(
    config: Path, *, signal_name: str | None, exit_code: int, start_iteration: int, env: Mapping[str, str] = os.environ
) -> Decision:
    """What a launch's end means for the run recorded in ``config`` (run/faults.py), without the
    evidence of failed ranks: for launchers that only see a signal and an exit code (the sweep)."""
    cfg = OmegaConf.load(config)
    plan = RunPlan.from_cfg(cfg)
    run_dir = Path(config).parent
    end = LaunchEnd(
        launch=launch_id(env) if env.get("SLURM_JOB_ID") else "sweep",
        signal=signal_name or None,
        exit_code=exit_code,
        start_iteration=start_iteration,
        end_iteration=saved_iteration(run_dir),
        finished=is_finished(run_dir, plan.train_iterations),
    )
    return cap_requeues(decide(classify(end), end, read_events(run_dir), cfg.resilience), env)


def cap_requeues(decision: Decision, env: Mapping[str, str]) -> Decision:
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    cap = int(env.get("ELLAMA_MAX_REQUEUES") or DEFAULT_MAX_REQUEUES)
    if decision.go_on and restart >= cap:
        return Decision(False, decision.kind, 4, f"requeue cap ELLAMA_MAX_REQUEUES={cap} reached: not requeueing")
    return decision


def excluded_nodes(run_dir: Path) -> list[str]:
    """Every node this run's requeues have excluded so far (exit 16 and cluster faults)."""
    nodes = set()
    for e in read_events(run_dir):
        nodes |= set(e.get("exclude") or [])
        if e.get("excluded") and e.get("node"):
            nodes.add(e["node"])
    return sorted(nodes)


def partition_nodes(env: Mapping[str, str]) -> tuple[list[str], list[str]] | None:
    """(every node of the job's partition, those Slurm could give it now: not down, drained or
    failing); None when Slurm does not say."""
    try:
        job = subprocess.run(
            ["scontrol", "-o", "show", "job", env["SLURM_JOB_ID"]], capture_output=True, text=True, timeout=30
        ).stdout
        partition = re.search(r"\bPartition=(\S+)", job).group(1)
        rows = subprocess.run(
            ["sinfo", "-h", "-N", "-p", partition, "-o", "%N %t"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired, AttributeError, KeyError):
        return None
    states = dict(r.split()[:2] for r in rows if len(r.split()) >= 2)
    usable = [n for n, state in states.items() if not re.match(r"(down|drain|drng|fail|maint|inval)", state)]
    return sorted(states), sorted(usable)


def exclusions_that_fit(
    new: tuple[str, ...], run_dir: Path, needed: int, env: Mapping[str, str]
) -> tuple[list[str], str, int | None]:
    """The nodes to exclude from the requeued job, what to log, and how many usable nodes the
    partition has outside the exclusions (None: Slurm did not say). A node is excluded only while
    the partition keeps enough nodes for the job without it: an exclusion that can never be met
    would hold the job forever, which is worse than retrying on a suspect node (a node that is really
    broken fails again, and the repeat rules stop the run)."""
    already = excluded_nodes(run_dir)
    nodes = partition_nodes(env)
    if nodes is None:
        return sorted({*already, *new}), "", None
    every, usable = nodes
    keep = []
    for node in new:
        if len(set(every) - {*already, *keep, node}) >= needed:
            keep.append(node)
    dropped = [n for n in new if n not in keep]
    note = (
        f"node(s) {', '.join(dropped)} not excluded: the partition would keep fewer than the {needed} node(s) "
        "the job needs"
        if dropped
        else ""
    )
    free = len(set(usable) - {*already, *keep})
    return sorted({*already, *keep}), note, free


def end_job(
    config: Path,
    signal_name: str,
    exit_code: int,
    start_iteration: int,
    log_dir: Path,
    env: Mapping[str, str] = os.environ,
) -> int:
    """After the ranks: classify how they ended (run/faults.py), log it in events.jsonl, requeue the
    job when the run goes on; returns the job's exit status."""
    run_dir = Path(config).parent
    cfg = OmegaConf.load(config)
    end = saved_iteration(run_dir)
    exit_code = take_rank_exit(run_dir, exit_code)
    log(f"ranks exited with {exit_code}; checkpoint iteration {start_iteration} -> {end}")
    launch = launch_id(env)
    if exit_code in (EXIT_RERUN_ELSEWHERE, EXIT_RESULT_REJECTED):
        return end_after_rejection(cfg, run_dir, exit_code, start_iteration, log_dir, env)
    text = tail(rank_stderr(log_dir, env))
    launch_end = LaunchEnd(
        launch=launch,
        signal=signal_name or None,
        exit_code=exit_code,
        start_iteration=start_iteration,
        end_iteration=end,
        finished=is_finished(run_dir, RunPlan.from_cfg(cfg).train_iterations),
        task_failures=task_failures_from_srun(text),
        rank_failures=read_rank_failures(run_dir, launch),
        hardware_lines=hardware_lines(text),
        verdict=read_verdict(run_dir, launch),
    )
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or 1)
    fault = classify(launch_end)
    decision = cap_requeues(
        decide(fault, launch_end, read_events(run_dir), cfg.resilience, excluded_nodes(run_dir)), env
    )
    exclude, note, free, resize = [], "", None, None
    if decision.go_on:
        # With resilience.min_nodes the job can go on with fewer: the exclusions may leave it that few.
        least = cfg.resilience.get("min_nodes") or nodes
        exclude, note, free = exclusions_that_fit(decision.exclude, run_dir, min(least, nodes), env)
        resize, short = fewer_nodes(cfg, nodes, free)
        note = "; ".join(n for n in (note, short) if n)
    new = [n for n in exclude if n not in excluded_nodes(run_dir)]
    record_launch_end(run_dir, fault, launch_end, decision, new, note, job=env.get("SLURM_JOB_ID"))
    if decision.kind == "finished" and not export_after_finish(cfg):
        return 1
    if not decision.go_on:
        return decision.exit_code
    job_id, restart = env["SLURM_JOB_ID"], int(env.get("SLURM_RESTART_COUNT") or 0)
    log(requeue_message(job_id, restart + 1, end))
    with open(Path(log_dir) / REQUEUE_LOG, "a") as f:
        f.write(
            f"restart {restart}: {start_iteration} -> {end}, {fault.kind}, signal {signal_name or 'none'}, "
            f"exit {exit_code}\n"
        )
    per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    return requeue(job_id, exclude if new else [], resize, resize * per_node if resize else None)


def fewer_nodes(cfg, nodes: int, free: int | None) -> tuple[int | None, str]:
    """When the partition has fewer usable nodes than the job (``free``, outside its exclusions):
    under resilience.min_nodes, the most nodes at least that many on which the layout divides with
    the same global batch (None: no change); and what to log."""
    if free is None or free >= nodes:
        return None, ""
    least = cfg.resilience.get("min_nodes")
    if least is None:
        return None, (
            f"the job waits for its {nodes} node(s): {free} usable outside its exclusions "
            "(resilience.min_nodes lets it go on with fewer)"
        )
    plan = RunPlan.from_cfg(cfg)
    fewer = plan.fewest_nodes_below(free, int(least))
    if fewer is None:
        return None, (
            f"the job waits for its {nodes} node(s): {free} usable, and no layout on {least} to {free} node(s) "
            f"keeps global batch {plan.global_batch_size} whole (TP x PP x CP and micro batch x DP must divide)"
        )
    grown = plan.on_nodes(fewer)
    return fewer, (
        f"requeued on {fewer} of {nodes} node(s) (resilience.min_nodes={least}): DP {plan.dp} -> {grown.dp}, "
        f"gradient accumulation {plan.grad_accumulation} -> {grown.grad_accumulation}, same global batch"
    )


def export_after_finish(cfg) -> bool:
    """checkpoint.export_hf for a finished run; False (logged) when the export failed: a relaunch of
    the finished run tries it again."""
    try:
        export_finished_run(cfg, log=log)
    except Exception as exc:
        log(f"error: checkpoint.export_hf: {exc}; submit the job again to retry the export")
        return False
    return True


def end_after_rejection(cfg, run_dir: Path, exit_code: int, start_iteration: int, log_dir: Path, env) -> int:
    """Megatron's exit 16 (rerun on another node: requeue excluding this one) or 17 (diagnosed:
    stop, or under skip/rollback a result reproduced elsewhere: go on past it)."""
    resilience, launch = cfg.resilience, launch_id(env)
    context = {"launch": launch, "start_iteration": start_iteration, "job": env.get("SLURM_JOB_ID")}
    if exit_code == EXIT_RESULT_REJECTED and resilience.spike_policy != "stop":
        # 17 after the rerun on another node (an exit-16 requeue): a result that reproduced there is the
        # data's, and skip/rollback set the save folder up for the next launch (run/recovery.py).
        if not after_rejection(run_dir, resilience, exit_code, **context):
            return exit_code
        log(f"requeueing job {env['SLURM_JOB_ID']} to go on after the {resilience.spike_policy}")
        return requeue(env["SLURM_JOB_ID"], [])
    report = exit_report(run_dir, exit_code)
    reruns = sum(
        e.get("exit_code") == 16 and str(e.get("action", "")).startswith("requeue") for e in read_events(run_dir)
    )
    cap = int(env.get("ELLAMA_MAX_RERUNS_ELSEWHERE") or DEFAULT_MAX_RERUNS_ELSEWHERE)
    restart, max_requeues = (
        int(env.get("SLURM_RESTART_COUNT") or 0),
        int(env.get("ELLAMA_MAX_REQUEUES") or DEFAULT_MAX_REQUEUES),
    )
    go_on = False
    if exit_code == EXIT_RESULT_REJECTED:
        action = (
            "stop: Megatron rejected a result and diagnosed it (exit 17); see events.jsonl and "
            "result_rejected.txt in the run folder"
        )
    elif reruns >= cap:
        action = f"stop: exit 16 again after {reruns} reruns on other nodes (ELLAMA_MAX_RERUNS_ELSEWHERE={cap})"
    elif restart >= max_requeues:
        action = f"stop: requeue cap ELLAMA_MAX_REQUEUES={max_requeues} reached"
    else:
        go_on, action = True, "requeue excluding the node"
    log(describe(report))
    append_event(
        run_dir,
        **{k: v for k, v in report.items() if k != "kind"},
        kind=report["kind"],
        action=action,
        excluded=go_on,
        end_iteration=saved_iteration(run_dir),
        **context,
    )
    if not go_on:
        log(action)
        return exit_code
    log(
        f"exit 16: requeueing job {env['SLURM_JOB_ID']} (restart {restart + 1}) without node {report['node']}, "
        f"to rerun iteration {saved_iteration(run_dir) + 1} elsewhere"
    )
    return requeue(env["SLURM_JOB_ID"], excluded_nodes(run_dir))


def record_launch_end(run_dir: Path, fault, end: LaunchEnd, decision: Decision, new: list[str], note: str, **extra):
    append_event(run_dir, **end_event(fault, end, decision, "requeue", new, note, **extra))
    log(decision.reason + (f" ({note})" if note else ""))
    if decision.kind == "suspected_bug" and fault.traceback:
        log(f"the failing rank's traceback:\n{fault.traceback}")


def requeue(job_id: str, exclude: list[str], nodes: int | None = None, tasks: int | None = None) -> int:
    """Requeue the job, with ``exclude`` as its ExcNodeList when given, on ``nodes`` nodes (and
    ``tasks`` ranks) when given.

    Slurm takes an ExcNodeList only from a pending job ("Job is no longer pending execution" while
    it runs), and a requeued job is pending (while completing) at once: requeue, then exclude. The
    requeue SIGTERMs this batch job within KillWait; ignored here (and by scontrol, which inherits
    it) so that the exclusion is still set. The job cannot start before it has completed, so it
    never starts without the exclusion."""
    handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        status = subprocess.call(["scontrol", "requeue", job_id])
        if status != 0:
            return status
        if exclude:
            log(f"excluding nodes {','.join(exclude)} from job {job_id}")
            if subprocess.call(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(exclude)}"]) != 0:
                log("scontrol could not set the exclusion on the requeued job; it may land on the same node again")
        if nodes:
            log(f"job {job_id} goes on with {nodes} node(s)")
            if subprocess.call(["scontrol", "update", f"JobId={job_id}", f"NumNodes={nodes}", f"NumTasks={tasks}"]):
                log("scontrol could not change the job's node count; it waits for its full count")
        return 0
    finally:
        signal.signal(signal.SIGTERM, handler)


def tail(path: Path, limit: int = 4 << 20) -> str:
    """The end of a possibly huge log (the ranks' stderr of a long launch)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
