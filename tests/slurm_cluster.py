"""The `slurm_cluster` fixture: a real single-node Slurm on localhost (scripts/slurm_local.sh).

Started once per test session when it is not already running, and stopped at the end only if this
session started it. Where Slurm is absent and cannot be installed (no apt-get), tests that use it
are skipped with the reason, except in CI (CI=true) where that is an error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_local.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    conf: Path  # slurm.conf of the local cluster; SLURM_CONF points at it for the whole session

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(self.conf)})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; returns the job id. `env` adds to this process's environment (sbatch exports it)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            cwd=cwd or REPO,
            env={**os.environ, "SLURM_CONF": str(self.conf), **(env or {})},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 300, until=None) -> dict[str, str]:
        """Poll (sbatch --wait polls too slowly) until `until(job)` or a final state."""
        until = until or (lambda j: j.get("JobState") in FINAL_STATES)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job and until(job):
                return job
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise TimeoutError(f"job {job_id} did not reach the expected state in {timeout} s: {self.job(job_id)}")


def _script(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), cmd], capture_output=True, text=True)


def _unavailable(reason: str):
    message = f"local Slurm unavailable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: Slurm tests must run in CI)", pytrace=False)
    pytest.skip("!!! " + message + " -- Slurm tests SKIPPED !!!")


@pytest.fixture(scope="session")
def slurm_cluster():
    conf = Path(os.environ.get("ELLAMA_SLURM_DIR", "/tmp/ellama-slurm")) / "slurm.conf"
    started = False
    if _script("status").returncode != 0:
        if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
            _unavailable("sbatch not found and no apt-get to install Debian's slurm packages")
        if os.geteuid() != 0 and shutil.which("slurmctld") is None:
            _unavailable("Slurm is not installed and installing it needs root")
        proc = _script("start")
        if proc.returncode != 0:
            _unavailable(f"scripts/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}")
        started = True
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf)
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started:
            _script("stop")
