"""Bad and untrusted inputs, one row each, given to the tools as a user gives them: each tool's main
called as its command line calls it (conftest.call_tool: the same exit code, stdout and stderr,
without a new interpreter importing torch and Megatron per row); recipes/cpt.py and the rows on the
convention itself run as subprocesses.

Every row asserts the exit code, that the message names the file or key at fault, that no
Python traceback reaches the user, and that no output or temporary folder is left behind. The
code-execution rows hand the tools a pickle whose ``__reduce__`` writes a marker file and assert
the marker never appears. Disk-full and read-only rows mount a small tmpfs (root) or skip.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, call_tool, data_overrides, write_domain_datasets

from ellama_megatron.formats import indexed_dataset

PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


class WritesMarker:
    """Unpickling this creates the file ``path`` (what a crafted model file would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_refused(r: subprocess.CompletedProcess, *names: str, code: int = 2) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == code, (r.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    assert any(line.startswith("error: ") for line in r.stderr.splitlines()), r.stderr[-2000:]
    for name in names:
        assert str(name) in r.stderr, (name, r.stderr[-2000:])


def leftovers(folder: Path, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(folder)) - before)


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer, tiny_hf):
    """A tiny tokenizer, a tiny Hugging Face Llama, a JSONL corpus and indexed datasets."""
    from ellama_megatron.testing.tiny_llama import sample_texts

    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(50)))
    (root / "datasets").mkdir()
    data = write_domain_datasets(root / "datasets")
    return {"root": root, "tok": tiny_tokenizer, "hf": tiny_hf, "corpus": corpus, "data": data}


def _classifier_meta(fmt: str, **changes) -> dict:
    from ellama_megatron.classify.features import FeatureConfig

    meta = {"format": fmt, "features": FeatureConfig(n_features=1 << 10).to_dict(), "threshold": 0.5}
    meta.update(changes)
    return meta


# ---------------------------------------------------------------- no code execution


def test_old_joblib_classifier_is_refused_without_unpickling(tiny, tmp_path):
    """A classifier folder of the old format: model.joblib (a pickle) is never opened."""
    marker = tmp_path / "pwned"
    model = tmp_path / "clf"
    model.mkdir()
    (model / "classifier.json").write_text(json.dumps(_classifier_meta("ellama-domain-classifier/1")))
    (model / "model.joblib").write_bytes(pickle.dumps(WritesMarker(marker)))
    r = call_tool(
        "tools/domain_classifier.py",
        "filter",
        "--model",
        model,
        "--input",
        tiny["corpus"],
        "--out",
        tmp_path / "kept.jsonl",
    )
    assert_refused(r, model / "model.joblib", "retrain")
    assert not marker.exists()
    assert not (tmp_path / "kept.jsonl").exists()
    # The same folder as preprocessing's --domain-filter.
    out = tmp_path / "out"
    out.mkdir()
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--domain-filter",
        model,
        "--quiet",
    )
    assert_refused(r, "model.joblib")
    assert not marker.exists()
    assert os.listdir(out) == []


def test_classifier_weights_with_a_pickled_object_array_are_refused(tiny, tmp_path):
    marker = tmp_path / "pwned"
    model = tmp_path / "clf"
    model.mkdir()
    from ellama_megatron.classify.model import FORMAT

    (model / "classifier.json").write_text(json.dumps(_classifier_meta(FORMAT)))
    evil = np.empty(1, dtype=object)
    evil[0] = WritesMarker(marker)
    np.savez(model / "weights.npz", weights=evil, bias=np.zeros(1))
    r = call_tool(
        "tools/domain_classifier.py",
        "filter",
        "--model",
        model,
        "--input",
        tiny["corpus"],
        "--out",
        tmp_path / "kept.jsonl",
    )
    assert_refused(r, model / "weights.npz")
    assert not marker.exists()


def test_checkpoint_common_state_is_read_with_weights_only(tmp_path):
    """Our own torch.load of a checkpoint's objects never runs code from it."""
    from ellama_megatron.formats.torch_dist import CheckpointReader, write_checkpoint

    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_checkpoint(folder, [], {}, {"args": WritesMarker(marker)})
    assert not marker.exists()
    with pytest.raises(ValueError, match="common state"):
        CheckpointReader(folder).common_state()
    assert not marker.exists()
    # What Megatron's training saves (plain values, its arguments as a Namespace) still reads.
    import argparse

    plain = tmp_path / "plain"
    plain.mkdir()
    write_checkpoint(plain, [], {}, {"iteration": 7, "checkpoint_version": 3.0, "args": argparse.Namespace(lr=0.1)})
    state = CheckpointReader(plain).common_state()
    assert state["iteration"] == 7 and state["args"].lr == 0.1


# ---------------------------------------------------------------- classifier folder fields


@pytest.mark.parametrize("field", ["features", "char_ngrams"])
def test_classifier_json_missing_field_is_named(tiny, tmp_path, field):
    from ellama_megatron.classify.model import FORMAT

    model = tmp_path / "clf"
    model.mkdir()
    meta = _classifier_meta(FORMAT)
    if field == "features":
        del meta["features"]
    else:
        del meta["features"][field]
    (model / "classifier.json").write_text(json.dumps(meta))
    np.savez(model / "weights.npz", weights=np.zeros(1 << 10, np.float32), bias=np.zeros(1))
    r = call_tool(
        "tools/domain_classifier.py",
        "filter",
        "--model",
        model,
        "--input",
        tiny["corpus"],
        "--out",
        tmp_path / "kept.jsonl",
    )
    assert_refused(r, "classifier.json", field)
    assert not (tmp_path / "kept.jsonl").exists()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize(
    "alpha,needle", [("nan", "finite"), ("inf", "finite"), ("1.5", "--extrapolate"), ("-0.5", "--extrapolate")]
)
def test_merge_alpha(tiny, tmp_path, alpha, needle):
    out = tmp_path / "merged"
    r = call_tool("tools/merge.py", "--base", tiny["hf"], "--adapted", tiny["hf"], f"--alpha={alpha}", "--out", out)
    assert_refused(r, "--alpha", needle)
    assert os.listdir(tmp_path) == []


def test_merge_extrapolate_allows_alpha_outside_0_1(tiny, tmp_path):
    out = tmp_path / "merged"
    r = call_tool(
        "tools/merge.py", "--base", tiny["hf"], "--adapted", tiny["hf"], "--alpha=1.5", "--extrapolate", "--out", out
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------- preprocessing


def test_empty_input_is_refused_unless_allowed(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        empty,
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert_refused(r, str(empty), "--allow-empty")
    assert os.listdir(out) == []
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        empty,
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
        "--allow-empty",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "ds.manifest.json").read_text())["splits"]["train"]["documents"] == 0


def test_stale_temp_folder_of_a_killed_run_is_removed(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / ".ds.tmp-dead"
    stale.mkdir()
    (stale / "part00000_train.tokens").write_bytes(b"x" * 100)
    (stale / "owner").write_text(f"{os.uname().nodename} {dead.pid}\n")
    live = out / ".ds.tmp-live"
    live.mkdir()
    (live / "owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(stale) in r.stderr
    assert not stale.exists() and live.exists()  # a live run's folder is left alone
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == [live.name]


def test_existing_output_is_refused_without_overwrite(tiny, tmp_path):  # already handled: stays handled
    out = tmp_path / "out"
    out.mkdir()
    args = (
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert call_tool(*args).returncode == 0
    before = set(os.listdir(out))
    assert_refused(call_tool(*args), "--overwrite")
    assert leftovers(out, before) == []


def test_missing_input_is_named(tiny, tmp_path):  # already handled
    out = tmp_path / "out"
    out.mkdir()
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tmp_path / "nope.jsonl",
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert_refused(r, "nope.jsonl")
    assert os.listdir(out) == []


# ---------------------------------------------------------------- blend planning


def test_plan_blend_refuses_a_manifest_whose_dataset_is_missing(tiny, tmp_path):
    from ellama_megatron.data.blend_plan import PlanError, plan_blend
    from ellama_megatron.data.manifest import MANIFEST_FORMAT

    manifest = tmp_path / "src.manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "source": "src",
                "tokenizer": {"tokenizer_json_sha256": "x"},
                "splits": {
                    "train": {"prefix": "src_train", "documents": 1, "tokens": 1000, "text_bytes": 0, "languages": {}}
                },
            }
        )
    )
    indexed_dataset.idx_path(tmp_path / "src_train").touch()
    cfg = {
        "valid_by": "group",
        "groups": {"g": {"share": 1.0, "sources": {"s": {"share": 1.0, "manifests": [str(manifest)]}}}},
    }
    with pytest.raises(PlanError, match=r"src\.manifest\.json: its dataset .*src_train\.bin is missing"):
        plan_blend(cfg, 1e4, 64)


# ---------------------------------------------------------------- training config values


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.seq_length=0", "train.seq_length"),
        ("checkpoint.save_interval=-1", "checkpoint.save_interval"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.min_lr=1", "optim.min_lr"),
    ],
)
def test_training_values_refused_in_validation(tiny, tmp_path, override, key):
    run_dir = tmp_path / "run"
    r = run(
        "recipes/cpt.py", f"run_dir={run_dir}", *data_overrides(tiny["data"]), override, env={"ELLAMA_DRY_RUN": "1"}
    )
    assert r.returncode == 2, (r.returncode, (r.stdout + r.stderr)[-3000:])
    assert "Traceback" not in r.stdout + r.stderr and "ZeroDivisionError" not in r.stderr
    assert key in r.stderr
    assert not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------- evaluation


def test_evaluate_checks_data_before_the_model(tiny, tmp_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    # The model does not exist: an error about the data proves the data came first.
    r = call_tool(
        "tools/evaluate.py",
        "--model",
        tmp_path / "no_model",
        "--data",
        f"general={bad}",
        "--out",
        tmp_path / "ppl.json",
    )
    assert_refused(r, f"{bad}:2", "--text-key")
    assert not (tmp_path / "ppl.json").exists()


# ---------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def imported(tiny):
    from ellama_megatron.convert.importer import import_hf

    out = tiny["root"] / "ckpt"
    import_hf(tiny["hf"], out, quiet=True)
    return out


def test_export_of_truncated_distcp_names_the_file(imported, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(imported, ckpt)
    distcp = sorted(ckpt.rglob("*.distcp"))
    assert distcp
    with open(distcp[0], "r+b") as f:
        f.truncate(os.path.getsize(distcp[0]) // 2)
    out = tmp_path / "hf_out"
    r = call_tool("tools/convert_hf.py", "export", "--ckpt", ckpt, "--out", out, "--quiet")
    assert_refused(r, distcp[0].name, "truncated")
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p not in ("ckpt",)] == []


def test_import_of_missing_folder_is_named(tmp_path):  # already handled
    r = call_tool("tools/convert_hf.py", "import", "--hf-dir", tmp_path / "nothing", "--out", tmp_path / "ckpt")
    assert_refused(r, "nothing")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------- full disk, read-only output


@pytest.fixture
def small_mount(tmp_path):
    """A 2 MiB tmpfs at tmp_path/mnt; root only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_import_onto_a_full_disk(tiny, small_mount):
    _fill(small_mount)
    r = call_tool("tools/convert_hf.py", "import", "--hf-dir", tiny["hf"], "--out", small_mount / "ckpt", "--quiet")
    assert_refused(r, "no space left")
    assert os.listdir(small_mount) == ["filler"]


def test_export_onto_a_full_disk(imported, small_mount):
    _fill(small_mount)
    r = call_tool("tools/convert_hf.py", "export", "--ckpt", imported, "--out", small_mount / "hf", "--quiet")
    assert_refused(r, "no space left")
    assert os.listdir(small_mount) == ["filler"]


def test_import_onto_a_read_only_mount(tiny, small_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    r = call_tool("tools/convert_hf.py", "import", "--hf-dir", tiny["hf"], "--out", small_mount / "ckpt", "--quiet")
    assert_refused(r, "read-only")
    assert os.listdir(small_mount) == []


def test_preprocess_onto_a_full_disk(tiny, small_mount):
    _fill(small_mount)
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        small_mount / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert_refused(r, "no space left")
    assert os.listdir(small_mount) == ["filler"]


def test_preprocess_onto_a_read_only_mount(tiny, small_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        small_mount / "ds",
        "--tokenizer",
        tiny["tok"],
        "--quiet",
    )
    assert_refused(r, "read-only")
    assert os.listdir(small_mount) == []


# ---------------------------------------------------------------- the convention itself


@pytest.mark.parametrize(
    "args,name",
    [
        (
            (
                "tools/extend_vocab.py",
                "--hf-dir",
                "/nonexistent/hf",
                "--corpus",
                "x.jsonl",
                "--num-tokens",
                "10",
                "--out",
                "/tmp/never",
            ),
            "/nonexistent/hf",
        ),
        (
            (
                "tools/domain_classifier.py",
                "train",
                "--positive",
                "/nonexistent/p.jsonl",
                "--negative",
                "n.jsonl",
                "--out",
                "/tmp/never",
            ),
            "--positive",
        ),
    ],
)
def test_sys_exit_messages_follow_the_convention(args, name):
    """Messages a tool gives through sys.exit("...") come out as `error: ...` with exit 2."""
    assert_refused(run(*args), name)


def test_run_tool_convention(capsys):
    """A user error escaping a tool's main: one line, exit 2; with --debug the traceback."""
    from ellama_megatron.cli import run_tool

    def main(argv):
        raise ValueError("data/x.json: field 'y' is 3; set it to 4")

    assert run_tool(main, []) == 2
    assert capsys.readouterr().err == "error: data/x.json: field 'y' is 3; set it to 4\n"
    with pytest.raises(ValueError):
        run_tool(main, ["--debug"])
    full = OSError(28, "No space left on device", "/mnt/out.bin")
    assert run_tool(lambda argv: (_ for _ in ()).throw(full), []) == 2
    assert capsys.readouterr().err.startswith("error: /mnt/out.bin: no space left on the device;")
    with pytest.raises(RuntimeError):  # our own bugs keep their traceback
        run_tool(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")), [])
    # sys.exit("...") from a tool: the same convention; --help names --debug.
    assert run_tool(lambda argv: sys.exit("--x: must be 1"), []) == 2
    assert capsys.readouterr().err == "error: --x: must be 1\n"
    assert run_tool(lambda argv: sys.exit(0), ["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


# ---------------------------------------------------------------- dataset against model


@pytest.fixture(scope="module")
def preprocessed(tiny):
    out = tiny["root"] / "pre"
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        tiny["corpus"],
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--valid-fraction",
        "0.2",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "ds"


@pytest.mark.parametrize(
    "field,value,key", [("vocab_size", 1 << 20, "model.vocab_size"), ("eod", 3, "model.eos_token_id")]
)
def test_dataset_tokenizer_must_match_the_model(preprocessed, tmp_path, field, value, key):
    """Refused before launch from the manifest, naming it and the model's key (the ranks would
    otherwise fail at iteration 1 with an IndexError)."""
    folder = tmp_path / "data"
    shutil.copytree(preprocessed.parent, folder)
    manifest_file = folder / "ds.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    if field == "vocab_size":
        manifest["tokenizer"]["vocab_size"] = value
    else:
        manifest["documents"]["eod"]["token_id"] = value
    manifest_file.write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    r = run(
        "recipes/cpt.py",
        f"run_dir={run_dir}",
        f"data.train=[{{prefix:{folder}/ds_train,weight:1}}]",
        f"data.valid={{general:[{folder}/ds_valid]}}",
        env={"ELLAMA_DRY_RUN": "1"},
    )
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert str(manifest_file) in r.stderr and key in r.stderr
    assert not (run_dir / "config.yaml").exists()


def test_the_untouched_dataset_passes_the_manifest_check(preprocessed, tmp_path):
    """The dataset the rows above spoil, as written: the same check lets the dry run through."""
    ok = run(
        "recipes/cpt.py",
        f"run_dir={tmp_path / 'ok'}",
        f"data.train=[{{prefix:{preprocessed}_train,weight:1}}]",
        f"data.valid={{general:[{preprocessed}_valid]}}",
        env={"ELLAMA_DRY_RUN": "1"},
    )
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]


def test_overlong_document_is_skipped_and_reported(tiny, tmp_path):
    """A huge single line (one 50 MB line took 10 GB to tokenize) is skipped, counted and named."""
    corpus = tmp_path / "long.jsonl"
    lines = [json.dumps({"text": f"short document number {i}"}) for i in range(5)]
    lines.insert(2, json.dumps({"text": "word " * 1000}))
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = call_tool(
        "tools/preprocess_data.py",
        "--input",
        corpus,
        "--output-prefix",
        out / "ds",
        "--tokenizer",
        tiny["tok"],
        "--max-doc-chars",
        "1000",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "document over --max-doc-chars" in r.stderr and "line 3" in r.stderr.replace(":", " ")
    manifest = json.loads((out / "ds.manifest.json").read_text())
    assert manifest["skipped"]["by_reason"] == {"document over --max-doc-chars": 1}
    assert manifest["splits"]["train"]["documents"] == 5
