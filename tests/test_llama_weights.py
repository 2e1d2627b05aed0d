"""llama/weights.py: the Hugging Face names and shapes derived from the table are exactly those
transformers' LlamaForCausalLM has, and each row's two directions invert each other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ellama_megatron.llama import weights as W
from ellama_megatron.llama.config import load_model_config
from ellama_megatron.llama.hf import hf_llama_config


@pytest.mark.parametrize("preset", ["tiny", "llama31_8b"])
@pytest.mark.parametrize("tied", [False, True])
def test_derived_hf_shapes_are_transformers_own(preset, tied):
    from transformers import LlamaForCausalLM

    cfg = dataclasses.replace(load_model_config(preset), tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_llama_config(cfg))
    # A tied lm_head is the embedding itself: not a tensor of its own in the safetensors files.
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert W.hf_shapes(cfg) == theirs
    # In Hugging Face's order: embeddings, layer by layer, final norm, head.
    names = list(W.hf_shapes(cfg))
    assert names[0] == "model.embed_tokens.weight" and names[1].startswith("model.layers.0.")
    assert names[-1] == ("model.norm.weight" if tied else "lm_head.weight")
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers)


def test_every_row_round_trips():
    cfg = load_model_config("tiny")
    padded = 640
    g = torch.Generator().manual_seed(0)
    for m in W.mappings(cfg):
        shapes = m.hf_shapes(cfg, m.megatron_shape(cfg, cfg.vocab_size))
        tensors = [torch.randn(s, generator=g) for s in shapes]
        megatron = m.to_megatron(cfg, padded, tensors)
        assert tuple(megatron.shape) == m.megatron_shape(cfg, padded), m.megatron
        assert all(torch.equal(a, b) for a, b in zip(m.to_hf(cfg, megatron), tensors)), m.megatron
        assert len(m.hf_names(0)) == len(m.roles) == len(shapes)


def test_roles_name_the_hugging_face_tensors():
    qkv = next(m for m in W.TABLE if isinstance(m, W.QKVMapping))
    assert [n.rsplit(".", 2)[-2] for n in qkv.hf_names(3)] == ["q_proj", "k_proj", "v_proj"]
    mlp = next(m for m in W.TABLE if isinstance(m, W.GatedMLPMapping))
    assert mlp.hf_names(3) == ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
