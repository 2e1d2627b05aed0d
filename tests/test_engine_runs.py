"""The training engine end to end: real torchrun subprocesses of recipes/cpt.py on CPU (gloo)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, data_overrides, rank_processes, run_cpt

from ellama_megatron.formats.train_log import parse_train_log

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dp2(domain_data, tmp_path_factory):
    """The reference: 20 uninterrupted iterations at DP=2."""
    return run_cpt(tmp_path_factory.mktemp("dp2") / "run", domain_data)


def assert_trained(proc, log, iters=20):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert log.last_iteration == iters, f"reached iteration {log.last_iteration}, expected {iters}"
    first = log.train_loss[1]
    last = sum(log.train_loss[i] for i in range(iters - 2, iters + 1)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert set(log.valid_loss) == {"general", "ecommerce"}
    for domain, losses in log.valid_loss.items():
        assert losses[20] < losses[10], f"{domain} validation loss did not fall: {losses}"
        # The periodic pass at the last iteration and the end-of-run pass see the same weights and
        # data: one exact pass each, whatever the evaluations before.
        assert losses[20] == log.final_valid_loss[domain], f"{domain}: evaluations are not repeatable"


def test_dp2_trains_and_logs_each_domain(dp2):
    proc, log = dp2
    assert_trained(proc, log)
    run_dir = Path(proc.args[2].split("=", 1)[1])
    assert (run_dir / "done.json").exists()
    assert (run_dir / "checkpoints" / "checkpoint_record.yaml").exists()
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"


def test_tp2_gives_the_losses_of_dp2(dp2, domain_data, tmp_path):
    proc, log = run_cpt(tmp_path / "run", domain_data, "parallel=tp2")
    assert_trained(proc, log)
    _, ref = dp2
    for it, loss in ref.train_loss.items():
        assert log.train_loss[it] == pytest.approx(loss, abs=1e-5), f"iteration {it}"


def test_pp2_trains(domain_data, tmp_path):
    # Not compared with DP=2: Megatron seeds each pipeline stage differently (seed + 100 x PP rank),
    # so a fresh PP=2 model starts from other weights. Resuming at PP=2 (below) is compared.
    proc, log = run_cpt(tmp_path / "run", domain_data, "parallel=pp2")
    assert_trained(proc, log)


def assert_same_losses_after_resume(log, ref, resumed_at: int, tolerance: float):
    """Megatron prints the first iteration of a launch without resetting its loss accumulator, so
    the next printed loss is the mean of both iterations: compare that one as such."""
    first, second = resumed_at + 1, resumed_at + 2
    expected = {it: ref.train_loss[it] for it in range(first, ref.last_iteration + 1)}
    expected[second] = (ref.train_loss[first] + ref.train_loss[second]) / 2
    for it, loss in expected.items():
        slack = max(tolerance, 1e-6) if it == second else tolerance  # the mean of two printed values
        assert abs(log.train_loss[it] - loss) <= slack, f"iteration {it}: {log.train_loss[it]} vs {loss}"


@pytest.fixture(scope="module")
def stopped_at_10(domain_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    proc, log = run_cpt(run_dir, domain_data, "train.exit_interval=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.last_iteration == 10
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert not (run_dir / "done.json").exists()
    return run_dir


def test_resume_is_bit_identical(dp2, domain_data, stopped_at_10, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_10, run_dir)
    proc, log = run_cpt(run_dir, domain_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert min(log.train_loss) == 11, "the relaunch must resume after the saved iteration"
    assert log.last_iteration == 20
    _, ref = dp2
    assert_same_losses_after_resume(log, ref, resumed_at=10, tolerance=0.0)
    assert log.valid_loss["general"][20] == ref.valid_loss["general"][20]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_resume_at_another_layout(layout, dp2, domain_data, stopped_at_10, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_10, run_dir)
    proc, log = run_cpt(run_dir, domain_data, f"parallel={layout}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert min(log.train_loss) == 11 and log.last_iteration == 20
    _, ref = dp2
    assert_same_losses_after_resume(log, ref, resumed_at=10, tolerance=1e-4)


def test_sigterm_saves_then_relaunch_resumes(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    # Long enough to be caught mid-run: 400 iterations.
    args = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={run_dir}",
        *data_overrides(domain_data),
        *TINY_RUN,
        "train.train_tokens=409600",
        "checkpoint.save_interval=1000",
    ]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while parse_train_log(log_path.read_text()).last_iteration < 5:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    first = parse_train_log(log_path.read_text())
    saved = int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 5 <= saved < 400 and saved == first.last_iteration
    assert not (run_dir / "done.json").exists()

    # The next launch resumes there (stopped again soon after, to keep the test short).
    proc2, second = run_cpt(
        run_dir,
        domain_data,
        "train.train_tokens=409600",
        "checkpoint.save_interval=1000",
        f"train.exit_interval={saved + 3}",
    )
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert min(second.train_loss) == saved + 1 and second.last_iteration == saved + 3


def test_bf16_on_cpu_follows_fp32_and_resumes_exactly(dp2, domain_data, tmp_path):
    """The GPU's numerics through the same engine on CPU (optim.precision=bf16): bf16 weights in
    Megatron's Float16Module, fp32 main params and Adam moments in the distributed optimizer, an fp32
    gradient buffer reduced over gloo. What stays for a GPU: NCCL, CUDA kernels, TE's spec."""
    from ellama_megatron.formats.megatron_checkpoint import TRACKER_FILE, iteration_folder
    from ellama_megatron.formats.torch_dist import CheckpointReader

    run_dir = tmp_path / "run"
    proc, log = run_cpt(run_dir, domain_data, "optim.precision=bf16")
    assert_trained(proc, log)
    assert "using torch.bfloat16 for parameters" in proc.stdout
    _, ref = dp2
    # bf16 rounds each weight to 8 bits of mantissa: the fp32 curve within a few hundredths.
    assert max(abs(log.train_loss[i] - ref.train_loss[i]) for i in ref.train_loss) < 0.05
    assert log.train_loss != ref.train_loss
    saved = iteration_folder(run_dir / "checkpoints", 10)
    dtypes = {
        (key.startswith("optimizer."), str(md.properties.dtype))
        for key, md in CheckpointReader(saved).metadata.state_dict_metadata.items()
        if hasattr(md, "properties")
    }
    assert dtypes == {(False, "torch.bfloat16"), (True, "torch.float32")}

    # A relaunch from the iteration-10 checkpoint alone repeats the run exactly (2 iterations of it).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, resumed / "checkpoints" / saved.name)
    (resumed / "checkpoints" / TRACKER_FILE).write_text("10")
    proc, again = run_cpt(resumed, domain_data, "optim.precision=bf16", "train.exit_interval=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert min(again.train_loss) == 11 and again.last_iteration == 12
    assert again.train_loss[11] == log.train_loss[11]
    assert abs(again.train_loss[12] - (log.train_loss[11] + log.train_loss[12]) / 2) <= 1e-6
