"""The GPU presets' Megatron arguments are what Megatron-LM 0.19 runs: parsed and checked by its
own code as a rank on an H100 would, with no flag it changes, removes, calls deprecated or warns
about (a dropped feature is a warning and a run without it). No GPU needed: validation asks only
for the GPU's generation, answered as an H100's."""

from __future__ import annotations

import pytest
import torch
from conftest import composed

from ellama_megatron.engine.megatron_args import megatron_argv
from ellama_megatron.engine.train import RANK_ENVIRONMENT
from ellama_megatron.llama.megatron import megatron_overrides, parse_megatron_args
from ellama_megatron.run.plan import RunPlan

PRESETS = {
    "slurm_h100": ["cluster=slurm_h100"],
    "8b_node": ["model=llama31_8b", "parallel=llama31_8b_node", "train=paper", "cluster=slurm_h100", "cluster.nodes=8"],
    "70b_480": ["model=llama31_70b", "parallel=llama31_70b_480", "optim=cpt_70b", "train=paper", "cluster=slurm_h100"],
    # The optional features a user turns on: asynchronous saves, Weights & Biases, full recompute.
    "8b_options": [
        "model=llama31_8b",
        "parallel=llama31_8b_node",
        "train=paper",
        "cluster=slurm_h100",
        "cluster.nodes=8",
        "checkpoint.async_save=true",
        "logging.wandb_project=ellama",
        "parallel.recompute_granularity=full",
    ],
}


@pytest.fixture
def h100_rank(monkeypatch):
    """What argument validation reads of a rank's surroundings: the GPU generation (9: Hopper), the
    rank, and the environment every rank sets (Megatron asserts CUDA_DEVICE_MAX_CONNECTIONS under TP)."""
    import megatron.training.arguments as arguments

    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("RANK", "0")
    for name, value in RANK_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)

    def argv_for(preset: str, transformer_impl: str, tmp_path) -> tuple[RunPlan, list[str]]:
        cfg = composed(f"run_dir={tmp_path / 'run'}", *PRESETS[preset])
        plan = RunPlan.from_cfg(cfg)
        monkeypatch.setenv("WORLD_SIZE", str(plan.world_size))
        return plan, megatron_argv(cfg, plan.model, transformer_impl)

    return argv_for


@pytest.mark.parametrize("transformer_impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_preset_arguments_are_run_as_given(preset, transformer_impl, h100_rank, tmp_path):
    plan, argv = h100_rank(preset, transformer_impl, tmp_path)
    assert megatron_overrides(argv) == []
    args = parse_megatron_args(argv)
    # The GPU path: bf16 weights, fp32 main params and gradient reduction, NCCL, the distributed optimizer.
    assert args.bf16 and args.params_dtype == torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32
    assert args.main_params_dtype == torch.float32 and args.distributed_backend == "nccl"
    assert args.use_distributed_optimizer and args.overlap_grad_reduce and args.overlap_param_gather
    assert not args.use_cpu_initialization and args.transformer_impl == transformer_impl
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (
        plan.tp,
        plan.pp,
        plan.dp,
    )
    # Megatron's local spec cannot shard its norms over the sequence: sequence parallelism is TE's.
    assert args.sequence_parallel == (
        plan.tp > 1 and plan.sequence_parallel and transformer_impl == "transformer_engine"
    )
    if preset == "8b_options":
        assert args.async_save and args.use_persistent_ckpt_worker and args.wandb_project == "ellama"
        assert (args.recompute_granularity, args.recompute_method) == ("full", "uniform")


def test_the_check_names_what_megatron_would_drop(h100_rank, tmp_path):
    _, argv = h100_rank("slurm_h100", "local", tmp_path)  # TP 1
    problems = megatron_overrides([*argv, "--sequence-parallel", "--async-save"])
    assert "--sequence-parallel: Megatron's argument checks changed True to False" in problems
    assert "--async-save: Megatron's argument checks changed True to False" in problems
    assert any("Disabling sequence parallelism" in p for p in problems)
    assert megatron_overrides([*argv, "--no-such-flag"]) == ["--no-such-flag: not a Megatron-LM argument"]
