"""Resilience on a real Slurm and under real kills: Megatron's exit 16 requeued by slurm/launch.sh with the
node excluded in Slurm itself, its exit 17 stopping the job with a report, and a run resumed from its
last complete checkpoint after kill -9 at random moments."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, rejections
from test_slurm import SBATCH_CPU, TINY

from ellama_megatron.formats.train_log import iterations_logged
from ellama_megatron.run.progress import LATEST_ITERATION_FILE

OTHER_NODE_SUFFIX = "-other"

# slurm/launch.sh sources ELLAMA_SITE_ENV at each start of the job. A one-machine cluster has no second
# node, so from the first requeue on, the site env runs the ranks in their own UTS namespace under
# another host name: Megatron tells nodes apart by os.uname(), and its rerun from the checkpoint must
# see another node. Only the ranks' host name is changed; Slurm's node (and its exclusion) is real.
SITE_ENV = """\
if [[ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]]; then
    export ELLAMA_PYTHON={wrapper}
fi
"""
WRAPPER = """\
#!/bin/bash
exec unshare --uts bash -c 'hostname "$(hostname){suffix}" && exec "$@"' _ {python} "$@"
"""


def other_node_site_env(tmp: Path) -> Path:
    wrapper = tmp / "python-on-other-node"
    wrapper.write_text(WRAPPER.format(suffix=OTHER_NODE_SUFFIX, python=REPO / ".venv" / "bin" / "python"))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    site_env = tmp / "site.env"
    site_env.write_text(SITE_ENV.format(wrapper=wrapper))
    return site_env


def unshare_works() -> bool:
    return subprocess.run(["unshare", "--uts", "hostname", "x"], capture_output=True).returncode == 0


@pytest.mark.slurm
def test_exit_16_requeues_without_the_node_and_the_rerun_elsewhere_stops_with_17(slurm_cluster, tiny_blend, tmp_path):
    """Megatron's error injection rejects the loss of iteration 2 as reproducible on this GPU: it saves
    iteration 1 and exits 16. The job must be requeued with its node in Slurm's ExcNodeList (on this
    one-node cluster it then stays pending: the exclusion is real), and the exclusion in events.jsonl.
    The test then lifts the exclusion, standing in for the scheduler's other node, whose ranks see
    another host name. There Megatron reruns iteration 2 from the checkpoint, finds the result
    reproducible elsewhere too, and exits 17 (its diagnosis): the job stops, not requeued, reporting
    iteration, node and the check. A relaunch with the rerun state machine off then trains to the end."""
    if not unshare_works():
        pytest.skip("unshare --uts is not allowed here: the requeued ranks cannot stand in for another node")
    node = slurm_cluster.run(
        "scontrol", "show", "hostnames", slurm_cluster.run("sinfo", "-h", "-o", "%N").strip()
    ).split()[0]
    run_dir, out, iters = tmp_path / "run", tmp_path / "job.out", 4
    common = [*TINY, f"train.train_tokens={iters * 8 * 128}", f"data.blend_file={tiny_blend}", f"run_dir={run_dir}"]
    env = {"ELLAMA_LOG_ROOT": str(tmp_path / "logs"), "ELLAMA_SITE_ENV": str(other_node_site_env(tmp_path))}
    job = slurm_cluster.sbatch(
        *SBATCH_CPU,
        "--job-name=exit16",
        f"--output={out}",
        "slurm/8b.sbatch",
        *common,
        "resilience.error_injection_rate=1",
        "resilience.error_injection_type=correct_result",
        env=env,
    )

    try:
        # Requeued and held back from the only node by Slurm itself.
        state = slurm_cluster.wait(
            job,
            timeout=600,
            until=lambda j: (
                j.get("Restarts") == "1"
                and j.get("JobState") == "PENDING"
                and j.get("Reason") not in ("BeginTime", "None")
            ),
        )
        log = out.read_text()
        assert state["ExcNodeList"] == node and state["Reason"] == "BadConstraints", (state, log[-3000:])
        assert (run_dir / LATEST_ITERATION_FILE).read_text().strip() == "1"  # the model from before the rejected step
        rejected = 2
        (first,) = rejections(run_dir)
        assert (first["rejection"], first["exit_code"], first["node"], first["excluded"], first["job"]) == (
            "rerun_elsewhere",
            16,
            node,
            True,
            str(job),
        )
        # Megatron's own number, one past the rejected iteration in the launch that rejected it.
        assert first["iteration"] == rejected + 1 and first["check"] == "found NaN in local forward loss calculation"
        assert first["action"] == "requeue excluding the node"
        assert f"excluding nodes {node} from job {job}" in log and "could not set the exclusion" not in log

        slurm_cluster.run("scontrol", "update", f"JobId={job}", "ExcNodeList=")  # the other node
        state = slurm_cluster.wait(job, timeout=300)
        log = out.read_text()
        assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "17:0", "1"), log[-3000:]
        second = rejections(run_dir)[1]
        # The same step: a launch that loaded the rerun's checkpoint numbers it exactly (Megatron's counter
        # comes from the checkpoint there).
        assert (second["rejection"], second["exit_code"], second["iteration"], second["node"], second["excluded"]) == (
            "result_rejected",
            17,
            rejected,
            node + OTHER_NODE_SUFFIX,
            False,
        )
        assert (
            second["check"] == "found NaN in local forward loss calculation"
            and second["status"] == "SECOND_RERUN_REPRODUCIBLE"
        )
        assert second["action"].startswith("stop: Megatron rejected a result and diagnosed it (exit 17)")
        assert re.search(
            rf"exit 17 \(result_rejected\): iteration {rejected}, rank \d on {node}{OTHER_NODE_SUFFIX}: "
            "found NaN in local forward loss calculation",
            log,
        )
        assert "requeueing job" not in log[log.index("restart 1:") :]
        assert (run_dir / LATEST_ITERATION_FILE).read_text().strip() == "1"  # nothing saved past the rejection
    finally:  # excluded from the only node, a failed test's job would wait forever
        slurm_cluster.cancel(job)

    # Under spike_policy=stop the person decides: a relaunch that skips the rejected iteration goes on to
    # the end from the model saved before it (the rerun the checkpoint asks for is dropped:
    # runtime/wheel_fixes.py, 4).
    out = tmp_path / "resumed.out"
    job = slurm_cluster.sbatch(
        *SBATCH_CPU,
        "--job-name=resumed",
        f"--output={out}",
        "slurm/8b.sbatch",
        *common,
        f"resilience.iterations_to_skip=[{rejected}]",
        env={"ELLAMA_LOG_ROOT": str(tmp_path / "logs")},
    )
    state = slurm_cluster.wait(job, timeout=300)
    log = out.read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "from checkpoint iteration 1" in log
    trained = iterations_logged(log)
    assert trained == [it for it in range(2, iters + 1) if it != rejected]
    assert (run_dir / LATEST_ITERATION_FILE).read_text().strip() == str(iters)
