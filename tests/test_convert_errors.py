"""Each bad input to tools/convert_hf.py: a clear error naming the problem, and no output left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_convert_roundtrip import make_hf

from ellama_megatron.convert.hf_checkpoint import ConversionError
from ellama_megatron.convert.importer import import_hf
from ellama_megatron.llama import weights as W


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory, tiny_tokenizer):
    return make_hf(tmp_path_factory.mktemp("good") / "hf", tiny_tokenizer, shard="100KB")


@pytest.fixture
def hf(good_hf, tmp_path):
    """A private copy to damage."""
    import shutil

    return Path(shutil.copytree(good_hf, tmp_path / "hf"))


def assert_refused(hf: Path, out: Path, match: str, **kwargs):
    with pytest.raises(ConversionError, match=match):
        import_hf(hf, out, quiet=True, **kwargs)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name], "partial output left behind"


def edit_config(hf: Path, **changes):
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))


def shards(hf: Path) -> list[Path]:
    return sorted(hf.glob("*.safetensors"))


def test_missing_shard(hf, tmp_path):
    shards(hf)[1].unlink()
    assert_refused(hf, tmp_path / "out", "lists shards that are not in the folder")


def test_truncated_shard(hf, tmp_path):
    f = shards(hf)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    assert_refused(hf, tmp_path / "out", "truncated or corrupt")


def test_corrupt_header(hf, tmp_path):
    f = shards(hf)[0]
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    assert_refused(hf, tmp_path / "out", "corrupt")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0}}, "rope_type"),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "low_freq_factor",
        ),
    ],
)
def test_other_architecture(hf, tmp_path, changes, match):
    edit_config(hf, **changes)
    assert_refused(hf, tmp_path / "out", match)


def test_tokenizer_vocab_disagreeing_with_embedding(hf, tmp_path):
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {
            "id": 700,
            "content": "<|extra|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    assert_refused(hf, tmp_path / "out", "tokenizer has 701 ids but the embedding has 512 rows")


def test_config_disagreeing_with_weights(hf, tmp_path):
    edit_config(hf, intermediate_size=128)
    assert_refused(hf, tmp_path / "out", "config.json implies")


def test_tp_not_dividing_query_groups(hf, tmp_path):
    assert_refused(
        hf, tmp_path / "out", r"num_key_value_heads \(query groups\)=2 is not divisible by --target-tp 4", target_tp=4
    )


def test_existing_output_needs_overwrite(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--overwrite"):
        import_hf(hf, out, quiet=True)
    assert (out / "keep.txt").read_text() == "mine"
    import_hf(hf, out, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "release" / ".metadata").exists()


def test_failure_mid_write_leaves_nothing(hf, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = W.GatedMLPMapping.to_megatron

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return original(self, *args)

    monkeypatch.setattr(W.GatedMLPMapping, "to_megatron", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        import_hf(hf, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_cli_reports_error_and_exit_code(hf, tmp_path):
    edit_config(hf, model_type="gemma")
    proc = subprocess.run(
        [sys.executable, "tools/convert_hf.py", "import", "--hf-dir", str(hf), "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "config.json: model_type='gemma'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path):
    from ellama_megatron.convert.exporter import export_hf

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConversionError, match="checkpoint_record.yaml"):
        export_hf(tmp_path / "ckpt", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_verify_options_checked_before_work(good_hf, tmp_path):
    import torch

    if not torch.cuda.is_available():  # a GPU machine would accept cuda
        assert_refused(good_hf, tmp_path / "out", "--verify-device cuda: no GPU", verify=True, verify_device="cuda")
    assert_refused(good_hf, tmp_path / "out", "--verify-device tpu: expected", verify=True, verify_device="tpu")
    assert_refused(good_hf, tmp_path / "out", "--verify-dtype float16: expected", verify=True, verify_dtype="float16")
