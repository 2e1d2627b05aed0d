"""Small-scale ablations on Slurm: a Hydra multirun with one Slurm job per point, then one table.

    python recipes/sweep.py -m optim.lr=1e-5,3e-5 data.groups.general.share=0.5,0.7 \
        model=llama31_8b parallel=llama31_8b_node train=paper cluster=slurm_h100 \
        data=ellama train.train_tokens=2e9 hydra.sweep.dir=runs/sweeps/lr-mix
    python recipes/sweep.py -m hydra/launcher=slurm_cpu optim.lr=1e-3,3e-3 data.blend_file=blend.json

Takes the overrides of recipes/cpt.py; `-m` with comma-separated values sweeps. hydra-submitit-launcher
(`pip install -e .[slurm]`) submits one job per point (ellama_megatron/conf/hydra/launcher: slurm_h100 by default,
slurm_cpu for the local test cluster); its tasks are the ranks, one per GPU, as with slurm/*.sbatch.
Each point trains in <sweep dir>/<point number>/ (checkpoints, config.yaml, point.json: set
hydra.sweep.dir, not run_dir); when all
jobs have ended, <sweep dir>/sweep_table.md and .json hold each point's final training loss and
final per-domain validation losses (`python tools/sweep_table.py <sweep dir>` rebuilds them).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ellama_megatron.engine.validate import ConfigError
from ellama_megatron.launch import plan_lines, prepare
from ellama_megatron.sweep.table import POINT_FILE

DEFAULT_LAUNCHER = "hydra/launcher=slurm_h100"
TABLE_CALLBACK = "+hydra.callbacks.sweep_table._target_=ellama_megatron.sweep.SweepTableCallback"
RANK_ENTRY = ["-m", "ellama_megatron.engine.train"]  # one rank of the engine, as slurm/launch.sh starts it
PREPARE_TIMEOUT_S = 600  # how long ranks > 0 wait for rank 0 to validate and write the config


def write_point(point_file: Path, point: dict) -> None:
    tmp = point_file.with_name(POINT_FILE + ".tmp")
    tmp.write_text(json.dumps(point, indent=2) + "\n")
    tmp.replace(point_file)


def prepare_point(cfg, job, hc, restart: str) -> Path:
    """Rank 0 validates and writes the point's config and point.json; the other ranks wait for it.

    point.json names this attempt (job id, restart count), so that no rank reads a stale one."""
    point_file = Path(cfg.run_dir) / POINT_FILE
    attempt = {"job_id": job.job_id, "restart": restart}
    if job.global_rank == 0:
        point = {"num": hc.job.num, "overrides": list(hc.overrides.task), "log_dir": str(job.paths.folder), **attempt}
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        try:
            config_path = prepare(cfg)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            write_point(point_file, {**point, "error": str(exc)})  # the other ranks stop too
            # An exception, not SystemExit: submitit records it, and the driver reports the point failed.
            raise ConfigError(f"point {hc.job.num} ({' '.join(hc.overrides.task)}): {exc}") from None
        for line in plan_lines(cfg):
            print(line, flush=True)
        write_point(point_file, {**point, "config": str(config_path)})
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


def run_rank(config_path: Path, job) -> int:
    """Run this rank's engine in its own process (Megatron's globals, argv and exits stay out of
    Hydra and submitit). On submitit's time-limit/preemption signal the engine first saves and exits
    (SIGTERM: Megatron's exit-signal handler), then submitit requeues the point, which resumes."""
    requeue_signal = job._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    requeue = signal.getsignal(requeue_signal)
    # Slurm sends the signal to every process of the step: the engine must not die of it.
    proc = subprocess.Popen([sys.executable, *RANK_ENTRY, "--config", str(config_path)],
                            preexec_fn=lambda: signal.signal(requeue_signal, signal.SIG_IGN))
    caught: list[int] = []

    def save_and_exit(signum, frame):
        caught.append(signum)
        print(f"rank {job.global_rank}: got {signal.Signals(signum).name}: the engine checkpoints and exits, "
              "then the point is requeued", flush=True)
        proc.send_signal(signal.SIGTERM)

    signal.signal(requeue_signal, save_and_exit)
    # Poll, not wait(): a handler arriving inside wait() could not wait for the process itself.
    while proc.poll() is None:
        time.sleep(0.5)
    if caught and callable(requeue):
        requeue(caught[0], None)  # submitit: rank 0 requeues the job and exits; other ranks return
    return proc.returncode


@hydra.main(config_path="pkg://ellama_megatron.conf", config_name="config", version_base=None)
def main(cfg) -> None:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit("recipes/sweep.py: run it with -m (a multirun); for one run use recipes/cpt.py")
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError as exc:
        sys.exit(f"recipes/sweep.py: not inside a submitit Slurm job ({exc}); use hydra/launcher=slurm_h100 or slurm_cpu")
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


def default_overrides(argv: list[str]) -> list[str]:
    """The Slurm launcher and the table callback unless the command line chose otherwise."""
    extra = []
    if not any(a.startswith("hydra/launcher=") for a in argv):
        extra.append(DEFAULT_LAUNCHER)
    if not any(a.startswith(("hydra.callbacks", "+hydra.callbacks")) for a in argv):
        extra.append(TABLE_CALLBACK)
    return extra


if __name__ == "__main__":
    if any(a.startswith("run_dir=") for a in sys.argv[1:]):
        # Points sharing a run folder would resume from each other's checkpoints.
        sys.exit("recipes/sweep.py: each point trains in <hydra.sweep.dir>/<point>; set hydra.sweep.dir, not run_dir")
    # Next to the command line's own overrides: Hydra's parser wants them in one run.
    last = max((i for i, a in enumerate(sys.argv) if "=" in a and not a.startswith("-")), default=len(sys.argv) - 1)
    sys.argv[last + 1:last + 1] = default_overrides(sys.argv[1:])
    main()
