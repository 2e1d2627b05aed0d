"""One Llama -> Megatron translation: the TransformerConfig --verify builds its model with is, field by
field, the one a training run builds from its Megatron argument list."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from conftest import composed
from omegaconf import OmegaConf

from ellama_megatron.llama.config import LlamaConfig

# Fields that differ on purpose. --verify loads every parameter from the checkpoint, so it skips the
# random initialisation a training run needs.
VERIFY_ONLY = {"perform_initialization": False}


def same(a, b) -> bool:
    # Init methods are functools.partial objects: equal when they call the same thing the same way.
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (a.func, a.args, a.keywords) == (b.func, b.args, b.keywords)
    return a == b


def training_config(overrides: list[str], run_dir, monkeypatch):
    """The TransformerConfig of a CPU training run: its full argv through Megatron's parsing, then the
    translation megatron.training and our model provider use."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from ellama_megatron.engine.megatron_args import megatron_argv
    from ellama_megatron.llama.megatron import parse_megatron_args

    cfg = composed(f"run_dir={run_dir}", "model=tiny", *overrides)
    assert cfg.cluster.accelerator == "cpu"
    model = LlamaConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    monkeypatch.setenv("WORLD_SIZE", str(int(cfg.cluster.nodes) * int(cfg.cluster.procs_per_node)))
    args = parse_megatron_args(megatron_argv(cfg, model, "local"))
    return model, core_transformer_config_from_args(args)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.tie_word_embeddings=true", "model.rope_scaling_factor=null"],
    ],
    ids=["tiny", "tied_unscaled"],
)
def test_verify_builds_the_config_training_builds(overrides, tmp_path, monkeypatch):
    from ellama_megatron.convert.verify import model_config

    model, trained = training_config(overrides, tmp_path / "run", monkeypatch)
    monkeypatch.delenv("WORLD_SIZE")
    verified = model_config(model, on_gpu=False, dtype=torch.float32)
    assert type(verified) is type(trained)
    differing = {
        f.name: (getattr(trained, f.name), getattr(verified, f.name))
        for f in dataclasses.fields(trained)
        if not same(getattr(trained, f.name), getattr(verified, f.name))
    }
    assert differing == {name: (not value, value) for name, value in VERIFY_ONLY.items()}
    # And the architecture is the model's.
    assert (verified.num_layers, verified.hidden_size, verified.ffn_hidden_size) == (
        model.num_layers,
        model.hidden_size,
        model.ffn_hidden_size,
    )
    assert (verified.num_attention_heads, verified.num_query_groups, verified.kv_channels) == (
        model.num_attention_heads,
        model.num_query_groups,
        model.kv_channels,
    )
    assert verified.normalization == "RMSNorm" and verified.gated_linear_unit and not verified.add_bias_linear
    assert verified.layernorm_epsilon == model.norm_epsilon and verified.init_method_std == model.init_method_std


@pytest.mark.parametrize(
    "optim",
    [
        ["optim=cpt"],
        ["optim=cpt_rewarm"],
        ["optim=cpt_wsd"],
        ["optim=cpt_wsd", "optim.lr_wsd_decay_style=exponential", "optim.lr_wsd_decay_fraction=0.1"],
    ],
    ids=["cosine", "rewarm", "wsd", "wsd_exponential"],
)
def test_lr_schedule_presets_parse_as_megatron_arguments(optim, tmp_path, monkeypatch):
    """Each conf/optim preset's LR flags through Megatron's parsing and validation, and the curve the
    planner prints from Megatron's scheduler: warmup from lr_warmup_init, peak, floor at the end."""
    from ellama_megatron.engine.lr_schedule import lr_curve
    from ellama_megatron.engine.megatron_args import megatron_argv
    from ellama_megatron.llama.megatron import parse_megatron_args
    from ellama_megatron.run.plan import RunPlan

    cfg = composed(f"run_dir={tmp_path}", "model=tiny", "train.train_tokens=1024000", *optim)
    plan = RunPlan.from_cfg(cfg)
    monkeypatch.setenv("WORLD_SIZE", str(plan.world_size))
    args = parse_megatron_args(megatron_argv(cfg, plan.model, "local"))
    o = cfg.optim
    iters = plan.train_iterations  # 1000
    assert (args.lr_decay_style, args.lr_decay_iters, args.lr_warmup_iters) == (o.lr_decay_style, iters, 10)
    assert args.lr_warmup_init == o.lr_warmup_init
    if o.lr_decay_style == "WSD":
        assert args.lr_wsd_decay_style == o.lr_wsd_decay_style
        assert args.lr_wsd_decay_iters == round(o.lr_wsd_decay_fraction * iters)
    curve = lr_curve(cfg, [0, 10, 500, iters])
    assert curve[0] == o.lr_warmup_init == (o.min_lr if "optim=cpt_rewarm" in optim else 0.0)
    assert curve[10] == pytest.approx(o.lr) and curve[iters] == pytest.approx(o.min_lr)
    # Halfway: cosine is at the mean of peak and floor; WSD still holds the peak.
    assert curve[500] == pytest.approx(o.lr if o.lr_decay_style == "WSD" else (o.lr + o.min_lr) / 2, rel=0.02)


def test_lr_schedule_checks_name_the_key(tmp_path):
    from ellama_megatron.run.schema import typed

    def problems(*overrides):
        cfg = composed(f"run_dir={tmp_path}", *overrides)
        return " ".join(typed(cfg, "optim").problems())

    assert "optim.lr_warmup_init=0.001 must be in [0, optim.lr=3e-05]" in problems("optim.lr_warmup_init=1e-3")
    assert "optim.lr_wsd_decay_fraction=0.995" in problems("optim=cpt_wsd", "optim.lr_wsd_decay_fraction=0.995")
    assert "optim.lr_wsd_decay_style='sqrt' must be one of" in problems("optim.lr_wsd_decay_style=sqrt")
