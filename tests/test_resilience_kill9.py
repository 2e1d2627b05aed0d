"""kill -9 at random moments, some in the middle of a save: every relaunch of recipes/cpt.py resumes from
the last complete checkpoint, and the run ends with the losses of an uninterrupted one.

The number of kills is ELLAMA_TEST_KILL_CYCLES (default 1, what CI's time allows; docs/benchmarks.md records
a 20-cycle run by hand), their moments drawn from ELLAMA_TEST_KILL_SEED (default 1: its one kill is of
every process in the middle of a save, the case that loses most)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, data_overrides

from ellama_megatron.formats.megatron_checkpoint import TRACKER_FILE, complete_iterations
from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.run.progress import DONE_FILE

CYCLES = int(os.environ.get("ELLAMA_TEST_KILL_CYCLES", "1"))
SEED = int(os.environ.get("ELLAMA_TEST_KILL_SEED", "1"))
ITERS = 4 + 3 * CYCLES  # a launch trains 1 to 4 iterations before its kill: the last launch still has some left
# A save every other iteration, so that a good share of the kills land inside one.
RUN = [f"train.train_tokens={ITERS * 8 * 128}", "checkpoint.save_interval=2", "train.eval_interval=1000"]


def launch(run_dir: Path, data, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={run_dir}",
        *data_overrides(data),
        *TINY_RUN,
        *RUN,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def kill_9(processes) -> None:
    import psutil

    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def wait_until(condition, launcher: subprocess.Popen, log: Path, timeout: float = 240) -> bool:
    """Poll ``condition(log text)``; False when the launch ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(log.read_text(errors="replace")):
            return True
        if launcher.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"{log}: nothing to wait for after {timeout} s:\n{log.read_text()[-3000:]}")


def resumed_from(text: str) -> int:
    """The iteration a launch loaded (0: it started from scratch)."""
    loaded = parse_train_log(text).loads
    return loaded[-1] if loaded else 0


def expected_resume(save_dir: Path) -> int:
    """The newest complete checkpoint: what the relaunch must load (0 with none)."""
    complete = complete_iterations(save_dir) if save_dir.exists() else []
    return complete[-1] if complete else 0


@pytest.fixture(scope="module")
def uninterrupted(domain_data, tmp_path_factory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    launcher = launch(tmp / "run", domain_data, tmp / "run.log")
    assert launcher.wait(timeout=600) == 0, (tmp / "run.log").read_text()[-3000:]
    return parse_train_log((tmp / "run.log").read_text()).train_loss


@pytest.mark.slow
def test_random_kill_9_cycles_each_resume_from_the_last_complete_checkpoint(domain_data, uninterrupted, tmp_path):
    import psutil

    rng = random.Random(SEED)
    run_dir, save_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    started = time.monotonic()
    record = []  # per cycle: (resumed from, killed at iteration, mid-save, whom)
    expected = 0
    for cycle in range(CYCLES + 1):
        log = tmp_path / f"launch{cycle}.log"
        launcher = launch(run_dir, domain_data, log)
        context = f"seed {SEED}, cycle {cycle}, {log}"
        if cycle == CYCLES:  # the last launch runs to the end
            assert launcher.wait(timeout=600) == 0, f"{context}:\n{log.read_text()[-3000:]}"
            assert resumed_from(log.read_text()) == expected, context
            break
        mid_save = rng.random() < 0.5
        # Mostly all at once (a node lost); sometimes the launcher alone, whose ranks must follow it.
        whom = rng.choice(["every process", "every process", "every process", "the launcher"])
        # Kill in a save (just after it starts, when its files are being written; the launch's second, so
        # that a complete one precedes it) or between saves, after a random number of its iterations.
        if mid_save:
            ran = wait_until(lambda text: len(parse_train_log(text).saves_started) >= 2, launcher, log)
            time.sleep(rng.uniform(0, 0.2))
        else:
            steps = rng.randint(1, 4)
            ran = wait_until(lambda text, steps=steps: len(parse_train_log(text).train_loss) >= steps, launcher, log)
            time.sleep(rng.uniform(0, 1.0))
        if not ran:  # the run finished before the kill came
            assert launcher.returncode == 0, f"{context}:\n{log.read_text()[-3000:]}"
            assert resumed_from(log.read_text()) == expected, context
            break
        # The launch's every process: torchrun starts each rank in a session of its own, so by descent.
        family = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        kill_9(family if whom == "every process" else family[:1])
        launcher.wait()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"{context}: alive 30 s after the kill of {whom}: {[p.cmdline() for p in alive]}"
        text = log.read_text(errors="replace")
        parsed = parse_train_log(text)
        in_save = set(parsed.saves_started) - set(parsed.saves_completed)
        trained = parse_train_log(text).train_loss
        assert resumed_from(text) == expected, f"{context}: resumed from {resumed_from(text)}, not {expected}"
        record.append((expected, max(trained, default=expected), bool(in_save), whom))
        expected = expected_resume(save_dir)
        tracker = (save_dir / TRACKER_FILE).read_text().strip() if (save_dir / TRACKER_FILE).exists() else ""
        print(
            f"cycle {cycle}: resumed from {record[-1][0]}, killed {whom} at iteration {record[-1][1]}"
            f"{' in the save of ' + str(sorted(in_save)) if in_save else ''}; complete checkpoints "
            f"{complete_iterations(save_dir) if save_dir.exists() else []}, tracker {tracker!r}"
        )

    # The run completed, and the losses of its last launch are the uninterrupted run's (Megatron prints
    # the second iteration of a resumed launch as the mean of its first two: tests/test_slurm.py; a
    # launch from scratch prints as the uninterrupted one did).
    text = log.read_text()
    assert (run_dir / DONE_FILE).exists(), text[-3000:]
    last = parse_train_log(text).train_loss
    assert max(last) == ITERS
    reference = {it: uninterrupted[it] for it in last}
    if expected and expected + 2 in reference:
        reference[expected + 2] = (uninterrupted[expected + 1] + uninterrupted[expected + 2]) / 2
    assert last == pytest.approx(reference, rel=1e-5, abs=1e-6)
    mid = sum(r[2] for r in record)
    print(
        f"{len(record)} kill -9 cycles (seed {SEED}), {mid} in a save, each resumed from the last complete "
        f"checkpoint; final loss {last[ITERS]:.6f} = uninterrupted {uninterrupted[ITERS]:.6f}; "
        f"{time.monotonic() - started:.0f} s"
    )
