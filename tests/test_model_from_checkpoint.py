"""The model comes from the checkpoint: with checkpoint.init_from and no preset, the run trains the
model the import recorded; a preset or model.* override that disagrees with it is refused before
launch, naming each differing field."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import composed, data_overrides

from ellama_megatron.formats.megatron_checkpoint import megatron_layout, write_record
from ellama_megatron.launch.prepare import prepare
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.run.plan import RunPlan
from ellama_megatron.run.schema import ConfigError

# SmolLM2-135M's shape (a Llama-architecture model unlike any preset: tied embeddings, RoPE theta
# 1e5 without scaling, 49152 ids, 9 heads in 3 KV groups), as tools/convert_hf.py import records it.
SMOLLM2 = dataclasses.replace(
    load_model_config("tiny"),
    name="smollm2",
    num_layers=30,
    hidden_size=576,
    ffn_hidden_size=1536,
    num_attention_heads=9,
    num_query_groups=3,
    kv_channels=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rotary_base=100000.0,
    rope_scaling_factor=None,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
).to_dict()


@pytest.fixture
def imported(tmp_path):
    """An import's folder as the run sees it before loading: the tracker and the record."""
    root = tmp_path / "smollm2_megatron"
    root.mkdir()
    megatron_layout(root).mkdir()
    write_record(root, {"model": SMOLLM2, "convert": {"source": "smollm2", "target_tp": 1, "target_pp": 1}})
    return root


@pytest.fixture
def base(domain_data, tmp_path):
    return [f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data)]


def test_init_from_alone_trains_the_recorded_model(base, imported, tmp_path):
    cfg = composed(*base, f"checkpoint.init_from={imported}")
    assert RunPlan.from_cfg(cfg).model.to_dict() == SMOLLM2  # the plan (memory, argv) sees it before prepare
    written = yaml.safe_load(prepare(cfg).read_text())
    assert written["model"] == SMOLLM2  # the ranks build it from config.yaml
    record = yaml.safe_load((tmp_path / "run" / "checkpoints" / "checkpoint_record.yaml").read_text())
    assert record["model"] == SMOLLM2  # export, merge and evaluation of the run read it


def test_an_agreeing_override_is_accepted(base, imported):
    written = yaml.safe_load(
        prepare(
            composed(*base, f"checkpoint.init_from={imported}", "model.num_layers=30", "model.tie_word_embeddings=true")
        ).read_text()
    )
    assert written["model"] == SMOLLM2


def test_a_disagreeing_preset_is_refused_naming_each_field(base, imported):
    with pytest.raises(ConfigError) as e:
        prepare(composed(*base, "model=tiny", f"checkpoint.init_from={imported}"))
    msg = str(e.value)
    tiny = load_model_config("tiny").to_dict()
    differing = [
        k
        for k in SMOLLM2
        if k not in ("name", "init_method_std", "bos_token_id", "eos_token_id") and SMOLLM2[k] != tiny[k]
    ]
    assert len(differing) == 11
    for key in differing:
        assert f"model.{key}={tiny[key]!r} but checkpoint.init_from={imported} has {key}={SMOLLM2[key]!r}" in msg
    assert "model=auto" in msg and "checkpoint_record.yaml" in msg


def test_a_disagreeing_override_is_refused(base, imported):
    with pytest.raises(ConfigError) as e:
        prepare(composed(*base, f"checkpoint.init_from={imported}", "model.num_layers=4"))
    msg = str(e.value)
    assert f"model.num_layers=4 but checkpoint.init_from={imported} has num_layers=30" in msg
    assert msg.count(" but checkpoint.init_from=") == 1


def test_an_init_from_without_record_is_refused_with_the_file(base, tmp_path):
    folder = tmp_path / "not_an_import"
    folder.mkdir()
    with pytest.raises(ConfigError) as e:
        prepare(composed(*base, f"checkpoint.init_from={folder}"))
    assert f"checkpoint.init_from={folder}" in str(e.value) and "checkpoint_record.yaml: missing" in str(e.value)


def test_from_scratch_the_default_is_the_tiny_preset(base):
    written = yaml.safe_load(prepare(composed(*base, "model.num_layers=2")).read_text())
    assert written["model"] == {**load_model_config("tiny").to_dict(), "num_layers": 2}
