"""What the tests share: the checkout's path, composed configs, the tools called in this process,
tiny indexed datasets of two domains, a tiny tokenizer and Hugging Face model, a runner for real
training runs, and the local Slurm cluster."""

from __future__ import annotations

import contextlib
import importlib.util
import io
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

# The paper's 70B run (60 nodes of 8 H100), as the presets compose it.
PAPER_70B = ["model=llama31_70b", "parallel=llama31_70b_480", "optim=cpt_70b", "train=paper", "cluster=slurm_h100"]


def composed(*overrides):
    """ellama_megatron/conf's config with these Hydra overrides, as recipes/cpt.py composes it."""
    from hydra import compose, initialize_config_dir

    from ellama_megatron import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=list(overrides))


_TOOLS: dict = {}


def load_tool(name: str):
    """tools/<name>.py as a module, loaded once per test process."""
    if name not in _TOOLS:
        spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[name] = module
    return _TOOLS[name]


def call_tool(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python tools/<name>.py ARGS`` from the checkout's root, run in this process: the tool's main
    through cli.run_tool as its ``__main__`` calls it, its stdout and stderr captured, ``env`` added
    to the environment for the call. A subprocess pays the interpreter and the imports of torch,
    transformers and Megatron again (5-15 s on 2 cores); this pays them once per test process.
    Each tool's command line itself is still run as a subprocess by at least one test."""
    from ellama_megatron.cli import run_tool

    argv = [str(a) for a in args]
    main = load_tool(Path(script).stem).main
    out, err = io.StringIO(), io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp:  # argv, env and the working folder put back after
            mp.setattr(sys, "argv", [script, *argv])  # argparse's prog: the script's name
            for name, value in (env or {}).items():
                mp.setenv(name, value)
            mp.chdir(REPO)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_tool(main, argv)
    except BaseException:  # a bug of ours (run_tool lets it through): show what the tool had said
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise
    return subprocess.CompletedProcess([sys.executable, script, *argv], code, out.getvalue(), err.getvalue())


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


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """The tiny byte-level BPE with model=tiny's ids (vocab 512, <|end_of_text|>=2), trained once per
    session. Shared: a test that changes a tokenizer changes a copy."""
    from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer

    return train_tiny_tokenizer(sample_texts(100), tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory) -> Path:
    """The preprocessing tests' tokenizer: more text and a smaller vocabulary (400) than the tiny
    model's, so that documents take many merges. Shared, as tiny_tokenizer."""
    from ellama_megatron.testing.tiny_llama import sample_texts, train_tiny_tokenizer

    return train_tiny_tokenizer(sample_texts(300), tmp_path_factory.mktemp("data_tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random model=tiny Hugging Face Llama folder (seed 0) with tiny_tokenizer. Shared: a test
    that changes a model changes a copy."""
    from ellama_megatron.llama.config import load_model_config
    from ellama_megatron.testing.tiny_llama import write_random_hf_llama

    folder = tmp_path_factory.mktemp("tiny_hf") / "hf"
    return Path(write_random_hf_llama(folder, load_model_config("tiny"), seed=0, tokenizer_dir=tiny_tokenizer))


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


def rank_processes(pid: int) -> list:
    """The engine's ranks among the descendants of process ``pid`` (psutil.Process objects): not
    torchrun, which names the rank module too, nor the ranks' forked checkpoint helpers, which carry
    their rank's command line (engine/train.py names them)."""
    import psutil

    from ellama_megatron.engine.train import CHECKPOINT_HELPER_NAME

    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "ellama_megatron.engine.train" in " ".join(p.cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
        and p.name() != CHECKPOINT_HELPER_NAME
    ]


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


# ------------------------------------------------------------------ running in parallel (pytest-xdist)
#
# `make test` and `make test-fast` run the suite in 2 worker processes (-n 2, --dist loadgroup in
# pyproject.toml): a test module is one unit of work, so that its module fixtures (a converted
# model, a training run) are built once, on one worker; every test that reaches the local Slurm is
# in one unit on one worker (the cluster has one node and its tests expect their job to run, not
# to wait behind another's). The units that take longest start first, so that the last one to
# finish is short.


def _uses_slurm(item) -> bool:
    return item.get_closest_marker("slurm") is not None or "slurm_cluster" in item.fixturenames


def _unit(item) -> str:
    marker = item.get_closest_marker("xdist_group")
    if marker is not None:
        return marker.args[0] if marker.args else marker.kwargs.get("name", "default")
    return "slurm" if _uses_slurm(item) else item.nodeid.split("::")[0]


def pytest_itemcollected(item):
    # Here, not in pytest_collection_modifyitems: xdist's worker turns the groups into test ids in
    # its own modifyitems, which pluggy calls before a conftest's, tryfirst or not (a module's
    # tests were split over both workers).
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # one process: the order of the files
    # Longest first: the Slurm unit, then units with end-to-end (slow) runs, most of them first;
    # within a unit the order of the file.
    slow: dict[str, int] = {}
    for item in items:
        slow[_unit(item)] = slow.get(_unit(item), 0) + (item.get_closest_marker("slow") is not None)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(_unit(item), i)
    items.sort(key=lambda item: (_unit(item) != "slurm", -slow[_unit(item)], first[_unit(item)]))
