"""Shared fixtures: tiny indexed datasets of two domains, a runner for real training runs, and the
local Slurm cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ellama_megatron.formats.train_log import parse_train_log
from ellama_megatron.testing.slurm import LocalSlurm, SlurmError

REPO = Path(__file__).resolve().parent.parent

# Two domains over disjoint token ranges with a learnable pattern each, so that each validation
# loss responds to its own training data.
DOMAINS = {"general": (4, 200), "ecommerce": (200, 500)}


def write_domain_datasets(out: Path, seed: int = 0) -> dict[str, dict[str, str]]:
    from ellama_megatron.formats import indexed_dataset

    rng = np.random.default_rng(seed)
    prefixes: dict[str, dict[str, str]] = {}
    for name, (lo, hi) in DOMAINS.items():
        for split, docs in (("train", 300), ("valid", 20)):
            prefix = out / f"{name}_{split}"
            documents = []
            for _ in range(docs):
                start = int(rng.integers(lo, hi - 10))
                documents.append([start + i % 7 for i in range(int(rng.integers(20, 200)))] + [2])
            indexed_dataset.write_documents(prefix, documents, np.int32)
            prefixes.setdefault(name, {})[split] = str(prefix)
    return prefixes


@pytest.fixture(scope="session", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """The tokenizer-folder cache (formats/tokenizer_folder.py) of this session, not the user's;
    set in the environment, so tools run as subprocesses use it too."""
    from ellama_megatron.formats.tokenizer_folder import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("tokenizer_cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def domain_data(tmp_path_factory) -> dict[str, dict[str, str]]:
    return write_domain_datasets(tmp_path_factory.mktemp("domains"))


def data_overrides(data: dict[str, dict[str, str]]) -> list[str]:
    train = ",".join(f"{{prefix:{d['train']},weight:1,group:{name}}}" for name, d in data.items())
    valid = ",".join(f"{name}:[{d['valid']}]" for name, d in data.items())
    return [f"data.train=[{train}]", f"data.valid={{{valid}}}"]


def write_tiny_data(root: Path) -> Path:
    """Two domains of random-ish token ids as Megatron indexed datasets, and their blend file."""
    from ellama_megatron.formats import indexed_dataset

    rng = np.random.default_rng(0)
    blend = {"train": [], "valid": {}}
    for name, low in (("general", 4), ("ecommerce", 200)):
        for split, docs in (("train", 300), ("valid", 20)):
            prefix = root / f"{name}_{split}"
            documents = []
            for _ in range(docs):
                n = int(rng.integers(20, 200))
                documents.append(np.append(low + (np.arange(n) * 7 + rng.integers(0, 5, n)) % 250, 2).astype(np.int32))
            indexed_dataset.write_documents(prefix, documents, np.int32)
            if split == "train":
                blend["train"].append({"prefix": str(prefix), "weight": 1.0})
            else:
                blend["valid"][name] = [str(prefix)]
    path = root / "blend.json"
    path.write_text(json.dumps(blend))
    return path


@pytest.fixture(scope="session")
def tiny_blend(tmp_path_factory) -> Path:
    """The Slurm tests' data: two domains and a blend file (data.blend_file)."""
    return write_tiny_data(tmp_path_factory.mktemp("slurm_data"))


def rejections(run_dir: Path) -> list[dict]:
    """The run's rejected-result events (Megatron's exit 16/17), without the launches' own events."""
    from ellama_megatron.run.events import read_events

    return [e for e in read_events(run_dir) if e["kind"] == "rejected_result"]


def load_safetensors_folder(folder: Path) -> dict:
    """Every tensor of a Hugging Face folder's safetensors shards."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# A tiny run that learns within 20 iterations (the paper's LR is far too small for that).
TINY_RUN = ["optim.lr=2e-3", "optim.min_lr=2e-4", "checkpoint.save_interval=10"]


def run_cpt(run_dir: Path, data, *overrides: str, timeout: int = 600, env: dict | None = None):
    """Run recipes/cpt.py as a user would; returns (CompletedProcess, TrainLog)."""
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "cpt.py"),
        f"run_dir={run_dir}",
        *data_overrides(data),
        *TINY_RUN,
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    (Path(run_dir).parent / f"{Path(run_dir).name}.log").write_text(proc.stdout + proc.stderr)
    return proc, parse_train_log(proc.stdout + proc.stderr)


def _slurm_unavailable(reason: str):
    message = f"local Slurm unavailable: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: Slurm tests must run in CI)", pytrace=False)
    pytest.skip("!!! " + message + " -- Slurm tests SKIPPED !!!")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm on localhost (ellama_megatron.testing.slurm), as a SlurmClient.

    Started once per test session when it is not already running, and stopped at the end only if
    this session started it. Where Slurm is absent and cannot be installed (no apt-get, not root),
    tests that use it are skipped with the reason, except in CI (CI=true) where that is an error."""
    local = LocalSlurm()
    try:
        client = local.start(cwd=REPO)
    except SlurmError as e:
        _slurm_unavailable(str(e))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(client.conf)
    try:
        yield client
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        local.stop()


@pytest.fixture(autouse=True, scope="module")
def release_process_groups():
    """In-process users of Megatron (the converter's --verify) leave a process group behind; tear
    it down after each test module so the next module can build its own."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
