"""llama/hf.py: config.json <-> LlamaConfig both ways, with Llama 3.1's RoPE constants stated once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ellama_megatron.llama.config import load_model_config
from ellama_megatron.llama.hf import (
    LLAMA3_ROPE_SCALING,
    UnsupportedConfig,
    generation_config_dict,
    hf_config_dict,
    llama_config_from_hf,
)


@pytest.mark.parametrize("preset", ["tiny", "llama31_8b", "llama31_70b"])
@pytest.mark.parametrize("scaled", [True, False])
def test_written_config_reads_back_to_the_same_llama_config(preset, scaled):
    cfg = load_model_config(preset)
    if not scaled:
        cfg = dataclasses.replace(cfg, rope_scaling_factor=None)
    written = hf_config_dict(cfg, torch.bfloat16)
    assert llama_config_from_hf(written, cfg.name) == cfg
    assert (written["dtype"], written["torch_dtype"]) == ("bfloat16", "bfloat16")
    # The transformers 4 keys carry the same RoPE as transformers 5's rope_parameters.
    if scaled:
        assert written["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            **LLAMA3_ROPE_SCALING,
        }
        assert {k: written["rope_parameters"][k] for k in LLAMA3_ROPE_SCALING} == LLAMA3_ROPE_SCALING
    else:
        assert written["rope_scaling"] is None
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == cfg.rotary_base
    assert generation_config_dict(cfg) == {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


def test_transformers_4_form_reads_the_same():
    cfg = load_model_config("tiny")
    written = hf_config_dict(cfg, torch.float32)
    old_style = {k: v for k, v in written.items() if k != "rope_parameters"}
    assert llama_config_from_hf(old_style, cfg.name) == cfg


@pytest.mark.parametrize("key", sorted(LLAMA3_ROPE_SCALING))
def test_a_rope_constant_megatron_does_not_use_is_refused(key):
    written = hf_config_dict(load_model_config("tiny"), torch.float32)
    written["rope_parameters"][key] = 2 * LLAMA3_ROPE_SCALING[key]
    with pytest.raises(UnsupportedConfig, match=f"rope_scaling.{key}.*Megatron fixes it"):
        llama_config_from_hf(written, "tiny", "x/config.json")


def test_a_missing_field_is_named():
    written = hf_config_dict(load_model_config("tiny"), torch.float32)
    del written["num_hidden_layers"]
    with pytest.raises(UnsupportedConfig, match="x/config.json: required field 'num_hidden_layers' missing"):
        llama_config_from_hf(written, "tiny", "x/config.json")
