"""One client for a Slurm cluster, shared by the test suite's `slurm_cluster` fixture and the demo:
find a cluster that answers, start and stop the local single-node one (slurm_local.sh, beside this
file), submit, read and wait for jobs.

    python -m ellama_megatron.testing.slurm start|stop|status|env   # the local cluster, by hand
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCAL_SCRIPT = Path(__file__).resolve().with_name("slurm_local.sh")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
# One node, two tasks, no GPU: command-line #SBATCH overrides of slurm/8b.sbatch's 8-node header.
SBATCH_CPU = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=UNLIMITED"]


class SlurmError(RuntimeError):
    pass


def local_conf() -> Path:
    """slurm.conf of the local cluster (slurm_local.sh writes it under ELLAMA_SLURM_DIR)."""
    return Path(os.environ.get("ELLAMA_SLURM_DIR", "/tmp/ellama-slurm")) / "slurm.conf"


@dataclass
class SlurmClient:
    """Slurm's commands against one cluster: ``conf`` is its slurm.conf (None: the environment's)."""

    conf: Path | None = None
    cwd: Path | None = None  # where sbatch runs, so that script paths such as slurm/8b.sbatch resolve

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        conf = {"SLURM_CONF": str(self.conf)} if self.conf else {}
        return {**os.environ, **conf, **(extra or {})}

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, env=self.env(), timeout=60)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def answers(self) -> bool:
        """A node of the cluster is up (idle, mixed or allocated)."""
        try:
            out = self.run("sinfo", "-h", "-o", "%T", check=True)
        except (SlurmError, subprocess.TimeoutExpired):
            return False
        return re.search(r"idle|mixed|alloc", out) is not None

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; returns the job id. `env` adds to this process's environment (sbatch exports it)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd or self.cwd, env=self.env(env)
        )
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def cancel(self, job_id: int | str) -> None:
        self.run("scancel", str(job_id), check=False)

    def wait(self, job_id: int, timeout: float = 300, until=None) -> dict[str, str]:
        """Poll (sbatch --wait polls too slowly) until `until(job)` or a final state."""
        until = until or (lambda j: j.get("JobState") in FINAL_STATES)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job and until(job):
                return job
            time.sleep(1)
        self.cancel(job_id)
        raise TimeoutError(f"job {job_id} did not reach the expected state in {timeout} s: {self.job(job_id)}")


def find_cluster(cwd: Path | None = None) -> SlurmClient | None:
    """A client of a running cluster whose node answers: SLURM_CONF's, the default one, or the local
    one; None when Slurm's commands are absent or nothing answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return None
    candidates = [Path(os.environ["SLURM_CONF"])] if os.environ.get("SLURM_CONF") else []
    candidates += [None, local_conf()] if local_conf().exists() else [None]
    for conf in candidates:
        client = SlurmClient(conf, cwd)
        if client.answers():
            return client
    return None


class LocalSlurm:
    """The local single-node cluster: started only when none runs, stopped only by whoever started it."""

    def __init__(self):
        self.started = False

    @staticmethod
    def script(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LOCAL_SCRIPT), command], capture_output=True, text=True)

    def running(self) -> bool:
        return self.script("status").returncode == 0

    def start(self, cwd: Path | None = None) -> SlurmClient:
        """A client of the local cluster, started first when it is not running (may install Debian's
        slurm and munge packages); SlurmError with the script's output when that fails."""
        if not self.running():
            proc = self.script("start")
            if proc.returncode != 0:
                raise SlurmError(f"{LOCAL_SCRIPT.name} start failed:\n{proc.stdout}{proc.stderr}")
            self.started = True
        client = SlurmClient(local_conf(), cwd)
        if not client.answers():
            raise SlurmError("the local Slurm runs but its node does not answer (sinfo)")
        return client

    def stop(self) -> bool:
        """Stop the cluster if this object started it; True when it did."""
        if not self.started:
            return False
        self.script("stop")
        self.started = False
        return True


if __name__ == "__main__":
    os.execvp("bash", ["bash", str(LOCAL_SCRIPT), *sys.argv[1:]])
