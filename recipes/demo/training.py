"""One training run of the demo: through slurm/8b.sbatch when a Slurm cluster answers (the local one
started on request), else recipes/cpt.py; its log parsed into losses."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ellama_megatron.testing.slurm import FINAL_STATES, SBATCH_CPU, LocalSlurm, SlurmClient, SlurmError, find_cluster

from .runner import REPO, DemoError, DemoOptions, run_tool

# The tiny CPU run of both training stages (their data, budget and LR come as further overrides).
TINY = ["model=tiny", "parallel=single", "train=tiny", "optim=cpt", "cluster=local_cpu"]
# --real: the same run without a model preset: model=auto takes SmolLM2 from checkpoint.init_from.
REAL = [o for o in TINY if not o.startswith("model=")]


def run_overrides(opts: DemoOptions) -> list[str]:
    return REAL if opts.real else TINY


def tokens_per_iteration(overrides: list[str]) -> int:
    """Tokens of one optimizer step of the tiny run (global batch x sequence, from its RunPlan), so
    that a budget of N iterations is N times this."""
    from hydra import compose, initialize_config_dir

    from ellama_megatron import CONF_DIR
    from ellama_megatron.run.plan import RunPlan

    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=[*TINY, "data=demo", *overrides])
        return RunPlan.from_cfg(cfg).tokens_per_step
    except Exception as e:  # Hydra's and OmegaConf's errors name the override at fault
        raise DemoError(f"the training overrides {list(overrides)}: {e}") from None


def progress_line(line: str) -> str | None:
    """Training progress worth printing: every 10th iteration and every validation loss."""
    from ellama_megatron.formats.train_log import compact_line

    short = compact_line(line)
    if short and short.startswith("iteration") and "validation" not in short:
        m = re.match(r"iteration\s+(\d+)/(\d+)", short)
        if m and int(m.group(1)) % 10 and m.group(1) not in ("1", m.group(2)):
            return None
    return short


def sbatch_train(overrides: list[str], log: Path, cluster: SlurmClient, job_name: str) -> int:
    """Submit slurm/8b.sbatch with the tiny CPU overrides, follow its output, return its exit code."""
    if log.exists():
        log.unlink()  # --open-mode=append: a resubmission would add to the old log
    try:
        job = cluster.sbatch(
            *SBATCH_CPU,
            f"--job-name={job_name}",
            f"--output={log}",
            "slurm/8b.sbatch",
            *overrides,
            env={"ELLAMA_LOG_ROOT": str(log.parent / "slurm_logs")},
            cwd=REPO,
        )
    except SlurmError as e:
        raise DemoError(str(e)) from None
    print(f"    submitted slurm/8b.sbatch as job {job} (1 node x 2 CPU tasks); following {log.name}", flush=True)
    seen, waiting_said = 0, False
    try:
        while True:
            state = cluster.job(job)
            if log.exists():
                text = log.read_text(errors="replace")
                # Whole lines only: the job is still writing the last one.
                complete = text[: text.rfind("\n") + 1]
                for line in complete[seen:].splitlines():
                    short = progress_line(line)
                    if short:
                        print("    " + short, flush=True)
                seen = len(complete)
            if state.get("JobState") == "PENDING" and not seen and not waiting_said:
                print(f"    job {job} is waiting for the node ({state.get('Reason', '?')})", flush=True)
                waiting_said = True
            if state.get("JobState") in FINAL_STATES:
                code = state.get("ExitCode", "1:0").split(":")[0]
                return 0 if state["JobState"] == "COMPLETED" else int(code or 1) or 1
            time.sleep(1)
    except BaseException:
        cluster.cancel(job)
        print(f"    cancelled job {job}", flush=True)
        raise


def launch(
    run_dir: Path, log: Path, overrides: list[str], opts: DemoOptions, local_slurm: LocalSlurm, job_name: str
) -> str:
    """Train; returns how it was launched."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = None if opts.launcher == "direct" else find_cluster(REPO)
    if cluster is None and opts.launcher == "slurm":
        print("    starting a local Slurm (python -m ellama_megatron.testing.slurm start)", flush=True)
        try:
            cluster = local_slurm.start(REPO)
        except SlurmError as e:
            raise DemoError(f"{e}\nrun with --launcher direct to train without Slurm") from None
    if cluster is not None:
        code = sbatch_train([*run_overrides(opts), f"run_dir={run_dir}", *overrides], log, cluster, job_name)
        if code:
            raise DemoError(f"the Slurm job failed (exit {code}); see {log}")
        return "slurm/8b.sbatch on the local Slurm (1 node x 2 CPU tasks)"
    run_tool(["recipes/cpt.py", *run_overrides(opts), f"run_dir={run_dir}", *overrides], log, echo=progress_line)
    return "recipes/cpt.py (torchrun, 2 CPU ranks)"


def train(run_dir: Path, overrides: list[str], opts: DemoOptions, local_slurm: LocalSlurm, job_name: str) -> dict:
    """One training run, or the finished one an earlier demo left; its launcher, losses and log."""
    from ellama_megatron.formats.train_log import parse_train_log

    log = run_dir / "train.log"
    finished = (run_dir / "done.json").exists() and log.exists()
    if finished:
        # Trained in an earlier demo that stopped in a later step of this stage.
        print(f"    {run_dir.name} finished in an earlier run: reusing it", flush=True)
        parsed = parse_train_log(log.read_text(errors="replace"))
        launcher = (
            (run_dir / "launcher.txt").read_text().strip() if (run_dir / "launcher.txt").exists() else "an earlier run"
        )
    else:
        # An unfinished run starts over: the demo saves no intermediate checkpoints to resume from.
        shutil.rmtree(run_dir, ignore_errors=True)
        launcher = launch(run_dir, log, overrides, opts, local_slurm, job_name)
        (run_dir / "launcher.txt").write_text(launcher + "\n")
        parsed = parse_train_log(log.read_text(errors="replace"))
    if parsed.last_iteration != parsed.train_iters or not parsed.valid_loss:
        raise DemoError(f"training stopped at iteration {parsed.last_iteration} of {parsed.train_iters}; see {log}")
    valid = {d: [[i, v] for i, v in sorted(losses.items())] for d, losses in parsed.valid_loss.items()}
    return {
        "launcher": launcher,
        "log": str(log),
        "iterations": parsed.last_iteration,
        "valid": valid,
        "train_first": parsed.train_loss[min(parsed.train_loss)],
        "train_last": parsed.train_loss[parsed.last_iteration],
    }


def valid_change(valid: dict) -> str:
    """Validation losses per domain as ``first -> last`` (or the one value)."""
    if all(len(pts) == 1 for pts in valid.values()):
        return (
            ", ".join(f"{d} {pts[0][1]:.3f}" for d, pts in valid.items())
            + f" at iteration {next(iter(valid.values()))[0][0]}"
        )
    return ", ".join(f"{d} {pts[0][1]:.3f} -> {pts[-1][1]:.3f}" for d, pts in valid.items())
