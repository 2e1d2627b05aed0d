"""slurm/*.sbatch on a real single-node Slurm (ellama_megatron.testing.slurm), with the real launcher and
the real engine on the tiny CPU preset: a run, a preemption with requeue and resume, a finished
job that does not requeue, a failing job that does not loop, the 70B dry run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from ellama_megatron.formats.train_log import parse_train_log, requeues
from ellama_megatron.testing.slurm import SBATCH_CPU

# Periodic validation included: each evaluation is one full pass over whole DP steps, so a resumed
# run logs the same validation losses as an uninterrupted one (compared below).
TINY = ["model=tiny", "parallel=single", "train=tiny", "optim=cpt", "cluster=local_cpu", "checkpoint.save_interval=5"]
ITERS = 30


def submit(
    cluster, tmp: Path, name: str, overrides: list[str], blend: Path, env: dict | None = None
) -> tuple[int, Path]:
    run_dir = tmp / name
    out = tmp / f"{name}.out"
    job = cluster.sbatch(
        *SBATCH_CPU,
        f"--job-name={name}",
        f"--output={out}",
        "slurm/8b.sbatch",
        *TINY,
        f"train.train_tokens={ITERS * 8 * 128}",
        f"data.blend_file={blend}",
        f"run_dir={run_dir}",
        *overrides,
        env={"ELLAMA_LOG_ROOT": str(tmp / "logs"), **(env or {})},
    )
    return job, out


def final_losses(log: str) -> tuple[dict[int, float], dict[str, float]]:
    """Training loss per iteration, and per domain the last validation loss (the final full pass)."""
    parsed = parse_train_log(log)
    return parsed.train_loss, {d: v[max(v)] for d, v in parsed.valid_loss.items()}


def wait_for_text(path: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s")


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tiny_blend, tmp_path_factory):
    """An uninterrupted run: the preemption test must end with the same loss."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    job, out = submit(slurm_cluster, tmp, "ref", [], tiny_blend)
    state = slurm_cluster.wait(job, timeout=400)
    return job, state, out.read_text(), tmp


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_runs_engine_and_does_not_requeue_when_finished(reference_run):
    job, state, log, tmp = reference_run
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert state["Restarts"] == "0"
    train, valid = final_losses(log)
    assert sorted(train) == list(range(1, ITERS + 1))
    assert set(valid) == {"general", "ecommerce"}
    assert "run finished (iteration 30)" in log and "requeueing job" not in log
    # Per-job log folder with the resolved config.
    configs = list((tmp / "logs").glob(f"ref-{job}/config.restart0.yaml"))
    assert configs and "model:" in configs[0].read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_to_same_loss(slurm_cluster, tiny_blend, reference_run, tmp_path):
    job, out = submit(slurm_cluster, tmp_path, "preempt", [], tiny_blend)
    # After the first periodic save (iteration 5), as on a real cluster: the checkpoint writer's
    # helper process exists then, and Slurm's SIGTERM reaches it too (engine/train.py starts it deaf to it).
    wait_for_text(out, r"iteration\s+7/", timeout=400)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    state = slurm_cluster.wait(job, timeout=400, until=lambda j: j.get("JobState") == "COMPLETED")
    log = out.read_text()
    assert state["Restarts"] == "1", log[-3000:]
    assert "got SIGUSR1" in log
    requeued = requeues(log)
    assert [r for r, _ in requeued] == [1], log[-3000:]
    iteration = requeued[0][1]
    assert 7 <= iteration < ITERS
    second = log[log.index("restart 1:") :]
    assert f"from checkpoint iteration {iteration}" in second
    train_second, _ = final_losses(second)
    assert min(train_second) == iteration + 1  # resumes where it saved: no step repeated or skipped
    assert max(train_second) == ITERS
    ref_train, ref_valid = final_losses(reference_run[2])
    train, valid = final_losses(log)
    # Same data order and state: every loss after the resume is the uninterrupted run's, except that
    # Megatron prints the second iteration of a launch as the mean of the first two (its loss
    # accumulator is not reset after the first), as in tests/test_engine_runs.py.
    expected = {it: ref_train[it] for it in range(iteration + 1, ITERS + 1)}
    expected[iteration + 2] = (ref_train[iteration + 1] + ref_train[iteration + 2]) / 2
    assert {it: train_second[it] for it in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert train[ITERS] == pytest.approx(ref_train[ITERS], rel=1e-6)
    assert set(valid) == {"general", "ecommerce"}
    assert valid == pytest.approx(ref_valid, rel=1e-6)
    # The periodic validations after the resume, too.
    resumed_valid = parse_train_log(second).valid_loss
    ref_all_valid = parse_train_log(reference_run[2]).valid_loss
    eval_interval = 10  # conf/train/tiny.yaml
    assert {it for v in resumed_valid.values() for it in v} == set(
        range(eval_interval, ITERS + 1, eval_interval)
    ) - set(range(iteration + 1))  # each one after the saved iteration; those up to it ran before the signal
    for domain, losses in resumed_valid.items():
        assert losses == pytest.approx({it: ref_all_valid[domain][it] for it in losses}, rel=1e-6)


@pytest.mark.slurm
def test_failing_job_does_not_loop(slurm_cluster, tiny_blend, tmp_path):
    job, out = submit(slurm_cluster, tmp_path, "broken", ["parallel.tensor_model_parallel_size=3"], tiny_blend)
    state = slurm_cluster.wait(job, timeout=200)
    assert state["JobState"] == "FAILED"
    assert state["Restarts"] == "0"
    assert "not requeueing" in out.read_text()


def test_dry_run_70b_plans_480_gpus_fitting_80gb():
    proc = subprocess.run(
        ["bash", "slurm/70b.sbatch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "ELLAMA_DRY_RUN": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"world size\s+480 = 60 nodes x 8", proc.stdout)
    assert re.search(r"TP / PP / CP / DP\s+8 / 4 \(VP 5\) / 1 / 15", proc.stdout)
    gib = float(re.search(r"memory per GPU\s+([0-9.]+) GiB of 80 GB: fits", proc.stdout).group(1))
    assert 20 < gib < 80
    for field in (
        "micro / global batch",
        "gradient accumulation",
        "iterations for the token budget",
        "tokens per step",
    ):
        assert field in proc.stdout


def test_dry_run_refuses_oversized_layout_with_numbers():
    proc = subprocess.run(
        [
            "bash",
            "slurm/70b.sbatch",
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            "parallel.virtual_pipeline_model_parallel_size=null",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "ELLAMA_DRY_RUN": "1"},
    )
    assert proc.returncode == 1
    assert re.search(r"REFUSED: layout TP1 PP1 CP1 DP480 of llama31_70b needs [0-9.]+ GiB per GPU", proc.stderr)


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_one_job_per_point_survives_preemption_and_writes_the_table(
    slurm_cluster, tiny_blend, reference_run, tmp_path
):
    """Two points; the first is the reference run's config (lr 3e-5 is conf/optim/cpt.yaml's) and is
    preempted with submitit's signal: it must be requeued, resume and end with the reference's losses."""
    sweep_dir = tmp_path / "sweep"
    driver = subprocess.Popen(
        [
            sys.executable,
            "recipes/sweep.py",
            "-m",
            "hydra/launcher=slurm_cpu",
            "optim.lr=3e-5,1e-3",
            *TINY,
            f"train.train_tokens={ITERS * 8 * 128}",
            f"data.blend_file={tiny_blend}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not list((sweep_dir / ".submitit").glob("*_0/*_0_1_log.out")) and time.monotonic() < deadline:
            time.sleep(0.5)
        first_log = next((sweep_dir / ".submitit").glob("*_0/*_0_1_log.out"))
        wait_for_text(first_log, r"iteration\s+3/", timeout=400)
        first_job = first_log.parent.name
        slurm_cluster.run("scancel", "--signal=USR2", first_job)  # what Slurm sends before the time limit
        out, _ = driver.communicate(timeout=900)
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-4000:]
    assert "sweep table: 2 points" in out
    assert slurm_cluster.job(first_job)["Restarts"] == "1"
    points = json.loads((sweep_dir / "sweep_table.json").read_text())["points"]
    assert [p["num"] for p in points] == [0, 1]
    lrs = [float(next(o for o in p["overrides"] if o.startswith("optim.lr=")).split("=")[1]) for p in points]
    assert lrs == [3e-5, 1e-3]
    assert len({p["job_id"] for p in points}) == 2  # one Slurm job per point
    for point in points:
        assert point["finished"] and point["iterations"] == point["train_iters"] == ITERS
        # Two Slurm tasks = two ranks, and the table holds the final pass's losses from the job's logs.
        logs = sorted((sweep_dir / ".submitit" / point["job_id"]).glob("*_log.out"))
        assert len(logs) == 2
        text = "".join(p.read_text() for p in logs)
        assert "world size 2 = TP 1 x PP 1 x CP 1 x DP 2" in text
        final = parse_train_log(text).final_valid_loss
        assert set(final) == {"general", "ecommerce"}
        assert point["valid_loss"] == final
    # The preempted point saved on the signal, resumed from that iteration and matches the
    # uninterrupted sbatch run of the same config.
    text = "".join(p.read_text() for p in sorted(first_log.parent.glob("*_log.out")))
    assert "got SIGUSR2: the engine checkpoints and exits" in text
    before_exit = text[: text.index("exiting program after receiving SIGTERM")]
    saved = parse_train_log(before_exit).saves_started[-1]
    assert 3 <= saved < ITERS
    assert saved in parse_train_log(text).loads
    ref_train, ref_valid = final_losses(reference_run[2])
    assert points[0]["train_loss"] == pytest.approx(ref_train[ITERS], rel=1e-6)
    assert points[0]["valid_loss"] == pytest.approx(ref_valid, rel=1e-6)
    assert points[1]["valid_loss"] != points[0]["valid_loss"]  # a different learning rate, different results
    md = (sweep_dir / "sweep_table.md").read_text().splitlines()
    assert (
        md[0].split(" | ")[1:3] == ["optim.lr", "iterations"]
        and "valid ecommerce" in md[0]
        and "valid general" in md[0]
    )
    rows = [line for line in md[2:] if line.startswith("| ")]
    assert len(rows) == 2
    for row, point in zip(rows, points):
        assert f"{point['valid_loss']['general']:.4f}" in row and f"{point['valid_loss']['ecommerce']:.4f}" in row
    # tools/sweep_table.py rebuilds the same table from the folder.
    (sweep_dir / "sweep_table.json").unlink()
    rebuilt = subprocess.run(
        [sys.executable, "tools/sweep_table.py", str(sweep_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((sweep_dir / "sweep_table.json").read_text())["points"] == points


@pytest.mark.slurm
def test_sweep_point_with_invalid_config_fails_at_once(slurm_cluster, tiny_blend, tmp_path):
    """Rank 0 refuses the point (the other rank stops on its point.json) and the driver reports it."""
    sweep_dir = tmp_path / "bad"
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/sweep.py",
            "-m",
            "hydra/launcher=slurm_cpu",
            "parallel.tensor_model_parallel_size=3",
            *TINY,
            f"data.blend_file={tiny_blend}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "ConfigError: point 0 (parallel.tensor_model_parallel_size=3" in proc.stderr
    assert "not divisible by TP x PP x CP" in json.loads((sweep_dir / "0" / "point.json").read_text())["error"]
    assert not (sweep_dir / "0" / "config.yaml").exists()
    # run_dir would make the points share one folder: refused before anything is submitted.
    shared = subprocess.run(
        [sys.executable, "recipes/sweep.py", "-m", "optim.lr=1e-3,3e-3", f"run_dir={tmp_path / 'x'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shared.returncode == 1 and "set hydra.sweep.dir, not run_dir" in shared.stderr
