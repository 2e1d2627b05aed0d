"""A month-long run survives its accidents: one launch per run folder, relaunches of finished or
cut-short runs, and ranks that die with their launcher. Real recipes/cpt.py subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_RUN, data_overrides
from ellama_megatron.formats.megatron_checkpoint import CheckpointFormatError
from ellama_megatron.launch.run_lock import LOCK_FILE
from ellama_megatron.run.progress import DONE_FILE, LATEST_ITERATION_FILE, repair_tracker


def cpt(run_dir: Path, data, *overrides: str, env: dict | None = None, timeout: int = 300):
    cmd = [sys.executable, str(REPO / "recipes" / "cpt.py"), f"run_dir={run_dir}", *data_overrides(data),
           *TINY_RUN, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def fake_checkpoint(save_dir: Path, iteration: int, complete: bool = True) -> Path:
    """An iter_* folder as torch_dist leaves it: complete once its metadata is written (last)."""
    folder = save_dir / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 16)
    if complete:
        (folder / ".metadata").write_bytes(b"meta")
        (folder / "common.pt").write_bytes(b"common")
    return folder


# -- clean relaunches ----------------------------------------------------------------------------

def test_a_finished_run_relaunched_exits_0_without_training(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / DONE_FILE).write_text('{"iteration": 20, "train_iters": 20}')
    proc = cpt(run_dir, domain_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run already finished" in proc.stdout and "nothing started" in proc.stdout
    assert "AssertionError" not in proc.stderr and "no samples left" not in proc.stderr


@pytest.mark.parametrize("text", ["", "  \n", "12x", "30"])  # cut short, junk, a folder that is not there
def test_a_broken_tracker_is_set_to_the_newest_complete_checkpoint(tmp_path, text):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10)
    fake_checkpoint(save_dir, 20)
    fake_checkpoint(save_dir, 25, complete=False)  # killed mid-save: never resumed from
    (save_dir / "latest_checkpointed_iteration.txt").write_text(text)
    warning = repair_tracker(tmp_path)
    assert "latest_checkpointed_iteration.txt" in warning and "set to 20" in warning
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert repair_tracker(tmp_path) is None  # sound now


def test_a_sound_or_absent_tracker_is_left_alone(tmp_path):
    assert repair_tracker(tmp_path) is None  # a new run
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10)
    fake_checkpoint(save_dir, 20)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("10")
    assert repair_tracker(tmp_path) is None
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_a_broken_tracker_without_a_complete_checkpoint_is_refused(tmp_path):
    save_dir = tmp_path / "checkpoints"
    fake_checkpoint(save_dir, 10, complete=False)
    (save_dir / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(CheckpointFormatError, match=r"latest_checkpointed_iteration.txt: is empty.*no complete iter_"):
        repair_tracker(tmp_path)
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == ""  # nothing changed


def test_the_recipe_repairs_or_refuses_an_empty_tracker_before_starting(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    save_dir = run_dir / "checkpoints"
    fake_checkpoint(save_dir, 10, complete=False)
    (run_dir / LATEST_ITERATION_FILE).write_text("")
    proc = cpt(run_dir, domain_data)
    assert proc.returncode == 2, "an empty tracker with nothing to resume must not exit 0"
    assert f"{run_dir / LATEST_ITERATION_FILE}: is empty" in proc.stderr
    fake_checkpoint(save_dir, 5)
    proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set to 5, the newest complete checkpoint" in proc.stderr
    assert (run_dir / LATEST_ITERATION_FILE).read_text() == "5"


# -- one run per folder --------------------------------------------------------------------------

HOLDER = """
import sys, time
from ellama_megatron.launch.run_lock import take_run_lock
fd = take_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_launch_on_a_run_folder_is_refused_naming_the_first(domain_data, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
        assert proc.returncode == 2
        assert f"{run_dir / LOCK_FILE}: run folder {run_dir} is in use by another launch" in proc.stderr
        assert f"pid={holder.pid}" in proc.stderr and "host=" in proc.stderr and "start=" in proc.stderr
        assert not (run_dir / "config.yaml").exists(), "the refused launch must not write the config the ranks read"
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the next launch goes ahead.
    proc = cpt(run_dir, domain_data, env={"ELLAMA_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "config.yaml").exists()
    assert f"pid={holder.pid}" not in (run_dir / LOCK_FILE).read_text()
