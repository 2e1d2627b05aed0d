"""The engine's seams: every wrapped Megatron function still exists with the parameters we rely on,
nothing outside the seam modules assigns a Megatron attribute, and the hooks report what they see."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from ellama_megatron.engine.megatron_hooks import HOOKS

# The three modules allowed to replace attributes of Megatron's modules, each with its pinned list.
SEAMS = {
    "ellama_megatron/engine/megatron_hooks.py",  # the training loop (HOOKS)
    "ellama_megatron/runtime/cpu.py",  # CUDA-only calls on a machine without a GPU (PATCHED_ATTRIBUTES)
    "ellama_megatron/runtime/wheel_fixes.py",  # defects of the 0.19.2 wheel (PATCHED_ATTRIBUTES)
}


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.attribute)
def test_hooked_function_keeps_its_parameters(hook):
    function = getattr(importlib.import_module(hook.module), hook.attribute, None)
    assert function is not None, f"{hook.module}.{hook.attribute} is gone: update engine/megatron_hooks.py"
    names = tuple(inspect.signature(function).parameters)
    assert names[: len(hook.parameters)] == hook.parameters, (
        f"{hook.module}.{hook.attribute}{inspect.signature(function)} no longer starts with {hook.parameters}: "
        "the wrapper in engine/megatron_hooks.py passes arguments by position; update it"
    )


def _megatron_names(tree: ast.AST) -> set[str]:
    """Names a file binds to Megatron modules or objects: ``from megatron.training import training``,
    ``import megatron.core as mc``, ``x = importlib.import_module("megatron....")``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron")}
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "attr", None) == "import_module"
            and node.value.args
            and isinstance(node.value.args[0], ast.Constant)
            and str(node.value.args[0].value).startswith("megatron")
        ):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def megatron_assignments(path: Path) -> list[str]:
    """``file:line`` of every assignment to, or setattr on, a Megatron module or object in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    bound = _megatron_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for target in targets:
            if isinstance(target, ast.Attribute) and _root(target) in bound | {"megatron"}:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_megatron_attribute_is_replaced_outside_the_seams():
    files = [
        p for folder in ("ellama_megatron", "recipes", "tools", "benchmarks") for p in (REPO / folder).rglob("*.py")
    ]
    offenders = [hit for p in files if str(p.relative_to(REPO)) not in SEAMS for hit in megatron_assignments(p)]
    assert not offenders, (
        f"Megatron attributes assigned outside the seam modules {sorted(SEAMS)}: {offenders}; "
        "wrap Megatron's loop in engine/megatron_hooks.py (listed in HOOKS and pinned here)"
    )


def test_the_scan_finds_a_replacement(tmp_path):
    """The check above is not vacuous: it sees the patterns a patch would use."""
    path = REPO / "tests" / "_tmp_patch_probe.py"
    path.write_text(
        "from megatron.training import training\nimport importlib\n"
        "training.train_step = None\n"
        "m = importlib.import_module('megatron.core.utils')\nsetattr(m, 'x', 1)\n"
    )
    try:
        assert megatron_assignments(path) == ["tests/_tmp_patch_probe.py:3", "tests/_tmp_patch_probe.py:5"]
    finally:
        path.unlink()


def test_install_wraps_every_hook_in_order(monkeypatch):
    """In this process: monkeypatch records each original first and puts it back after the test."""
    from ellama_megatron.engine.megatron_hooks import LoopHooks, install

    modules = [importlib.import_module(h.module) for h in HOOKS]
    originals = [getattr(m, h.attribute) for m, h in zip(modules, HOOKS)]
    for m, h, o in zip(modules, HOOKS, originals):
        monkeypatch.setattr(m, h.attribute, o)
    install(LoopHooks())
    for m, h, o in zip(modules, HOOKS, originals):
        now = getattr(m, h.attribute)
        assert now is not o and now.__wrapped__ is o, h.attribute


def test_straggler_clock_names_the_slow_rank_and_reports_a_sustained_one(tmp_path):
    """Two gloo ranks, rank 1 computing three times as long: the line names rank 1, the ratio is the
    slowest over the median (of two: their mean), and after 2 intervals in a row an event is logged."""
    code = f"""
import os, sys, time, torch.distributed as dist
from ellama_megatron.engine.stragglers import StragglerClock
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=rank, world_size=2)
clock = StragglerClock(factor=1.2, intervals=2, run_dir="{tmp_path}", on_gpu=False)
for interval in range(3):
    for step in range(2):
        clock.step_started(); time.sleep(0.05 * (3 if rank == 1 else 1)); clock.compute_ended()
    report = clock.report(interval + 1, False)
    if rank == 0:
        print(report.lines[0], round(report.scalars["stragglers/slowest over median compute"], 1))
dist.destroy_process_group()
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    lines = outs[0][0].splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "| stragglers | slowest rank 1 on " in line
        assert float(line.split()[-1]) == pytest.approx(1.5, abs=0.2)  # 150 ms over the median 100 ms
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["rank"], e["iteration"]) for e in events] == [("straggler", 1, 2)]  # once per streak


@pytest.mark.slow
def test_the_hooks_in_a_real_run(domain_data, tmp_path):
    """Two CPU ranks, 4 iterations: validation at iteration 0, our lines at each log interval, rank
    0's timeline of the launch, and no heartbeat folder left behind."""
    from conftest import run_cpt

    from ellama_megatron.formats.timeline import read_timelines

    run_dir = tmp_path / "run"
    proc, log = run_cpt(run_dir, domain_data, "train.eval_at_start=true", "train.train_tokens=4096")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(log.valid_loss["general"]) == {0, 4} and set(log.valid_loss["ecommerce"]) == {0, 4}
    assert sorted(log.tokens_per_second) == [2, 3, 4] and sorted(log.stragglers) == [1, 2, 3, 4]
    assert {r.rank for r in log.stragglers.values()} <= {0, 1}
    ((launch, events),) = read_timelines(run_dir).items()
    kinds = [e.event for e in events]
    assert kinds[:2] == ["start", "train_start"] and kinds[-1] == "done"
    assert [e.iteration for e in events if e.event == "step"] == [1, 2, 3, 4]
    assert kinds.count("eval_start") == kinds.count("eval_end") == 2 * 2  # two domains at iteration 0 and at the end
    assert not list(Path("/dev/shm").glob(f"ellama-heartbeats-*-{launch}"))
