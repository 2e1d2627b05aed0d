"""The exported config.json keeps the source's keys when the architecture is unchanged (what the
import carried in hf/config.json: pad_token_id, unk_token_id, a list of eos ids), and otherwise is
rebuilt from the record without transformers' generic clutter (id2label, _name_or_path)."""

from __future__ import annotations

import dataclasses
import json

import torch
from test_convert_roundtrip import make_hf

from ellama_megatron.convert.exporter import export_hf
from ellama_megatron.convert.importer import import_hf
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.llama.hf import GENERIC_CONFIG_KEYS, hf_config_dict


def test_export_keeps_the_source_config_keys(tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    hf = make_hf(tmp_path / "hf", tiny_tokenizer)
    source = json.loads((hf / "config.json").read_text())
    source.update(pad_token_id=0, unk_token_id=3, eos_token_id=[2, 3])  # keys our config does not hold
    (hf / "config.json").write_text(json.dumps(source))
    verify = import_hf(hf, tmp_path / "ckpt", verify=True, quiet=True)["verify"]
    # --verify also ran the models on real prose tokenized with the folder's tokenizer
    assert verify["real_text"]["tokens"] == 32 and verify["real_text"]["max_abs_logit_diff"] < 1e-4
    assert verify["tokens"] == 3 * 32
    stats = export_hf(tmp_path / "ckpt", tmp_path / "out", quiet=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert stats["config"] == "source"
    for key, value in source.items():
        if key not in ("dtype", "torch_dtype", "rope_parameters", "rope_scaling", "rope_theta"):
            assert written[key] == value, key
    assert written["rope_theta"] == 500000.0 and written["rope_parameters"]["rope_type"] == "llama3"
    assert LlamaForCausalLM.from_pretrained(tmp_path / "out").config.pad_token_id == 0


def test_another_architecture_gets_a_config_rebuilt_without_clutter():
    cfg = load_model_config("tiny")
    source = json.loads(json.dumps(hf_config_dict(cfg, torch.float32)))
    source["unk_token_id"] = 3
    wider = dataclasses.replace(cfg, vocab_size=640)  # e.g. after tools/extend_vocab.py
    rebuilt = hf_config_dict(wider, torch.float32, source)
    assert rebuilt["vocab_size"] == 640 and "unk_token_id" not in rebuilt
    assert not set(GENERIC_CONFIG_KEYS) & set(rebuilt)
    assert hf_config_dict(cfg, torch.float32, source)["unk_token_id"] == 3
