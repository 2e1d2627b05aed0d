"""A non-editable wheel ships every Hydra preset and eval task file, and an install of it composes
the configs from another folder (the presets are package data, not files of the checkout)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "ellama_megatron"
PRESETS = sorted(p.relative_to(REPO).as_posix() for p in (PACKAGE / "conf").rglob("*.yaml"))
TASK_FILES = sorted(
    p.relative_to(REPO).as_posix() for p in (PACKAGE / "eval" / "tasks").glob("*") if p.suffix in (".yaml", ".py")
)
DATA_FILES = ["ellama_megatron/testing/slurm_local.sh"]  # the local Slurm of ellama_megatron.testing.slurm


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of a copy of the project (the build's own files stay out of the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "ellama_megatron", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp / "dist").glob("ellama_megatron-*.whl")
    return whl


def test_wheel_lists_every_preset_task_file_and_script(wheel):
    assert "ellama_megatron/conf/config.yaml" in PRESETS and len(PRESETS) > 20
    assert "ellama_megatron/eval/tasks/ecom.yaml" in TASK_FILES
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in PRESETS + TASK_FILES + DATA_FILES if f not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_installed_wheel_composes_every_preset_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The project's dependencies come from this interpreter; ellama_megatron from the install, ahead of
    # the editable checkout on sys.path.
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(site)!r})
        from hydra import compose, initialize_config_dir, initialize_config_module
        import ellama_megatron
        from ellama_megatron import CONF_DIR

        groups = {{g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF_DIR.iterdir()
                  if g.is_dir() and g.name not in ("hydra", "__pycache__")}}
        composed = {{}}
        # The recipes' route (hydra.main with pkg://ellama_megatron.conf) and the tools' (CONF_DIR).
        with initialize_config_module("ellama_megatron.conf", version_base=None):
            for group, options in groups.items():
                for option in options:
                    cfg = compose("config", overrides=[f"{{group}}={{option}}"])
                    composed[f"{{group}}={{option}}"] = sorted(cfg[group])
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            model = compose("config", overrides=["model=llama31_8b"]).model.name
        print(json.dumps({{"package": ellama_megatron.__file__, "conf": str(CONF_DIR), "groups": groups,
                          "composed": composed, "model": model}}))
    """)
    run = tmp_path / "elsewhere"
    run.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["package"].startswith(str(site)) and got["conf"].startswith(str(site))
    want = {}
    for preset in PRESETS:
        parts = preset.split("/")
        if len(parts) == 4 and parts[2] != "hydra":
            want.setdefault(parts[2], []).append(Path(parts[3]).stem)
    assert got["groups"] == {g: sorted(o) for g, o in want.items()}
    assert len(got["composed"]) == sum(len(o) for o in want.values())
    assert all(keys for keys in got["composed"].values())
    assert got["model"] == "llama31_8b"
