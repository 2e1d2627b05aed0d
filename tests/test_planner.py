"""The planner against Megatron's own reference estimator and the paper's published figures."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from conftest import PAPER_70B, REPO, call_tool, composed

from ellama_megatron.llama.config import (
    attention_flops_per_token,
    flops_per_token,
    load_model_config,
    matmul_params,
)
from ellama_megatron.run.memory import GIB, check_fits, enumerate_layouts
from ellama_megatron.run.plan import LayoutError, padded_vocab_size

NODE_8B = ["model=llama31_8b", "parallel=llama31_8b_node", "train=paper", "cluster=slurm_h100", "cluster.nodes=8"]


def megatron_reference_args(report):
    m, L = report.model, report.layout
    return argparse.Namespace(
        kv_channels=m.kv_channels,
        num_attention_heads=m.num_attention_heads,
        hidden_size=m.hidden_size,
        group_query_attention=True,
        num_query_groups=m.num_query_groups,
        num_experts=None,
        swiglu=True,
        moe_shared_expert_intermediate_size=None,
        ffn_hidden_size=m.ffn_hidden_size,
        num_layers=m.num_layers,
        mtp_num_layers=None,
        normalization="RMSNorm",
        add_bias_linear=False,
        qk_layernorm=False,
        multi_latent_attention=False,
        moe_latent_size=None,
        expert_tensor_parallel_size=L.tp,
        expert_model_parallel_size=1,
        pipeline_model_parallel_size=L.pp,
        tensor_model_parallel_size=L.tp,
        world_size=L.world_size,
        untie_embeddings_and_output_weights=not m.tie_word_embeddings,
        padded_vocab_size=padded_vocab_size(m.vocab_size, L.tp),
        vocab_size=m.vocab_size,
        use_distributed_optimizer=L.distributed_optimizer,
        data_parallel_size=L.dp,
        seq_length=L.seq_length,
        micro_batch_size=L.micro_batch_size,
        virtual_pipeline_model_parallel_size=L.vp,
        sequence_parallel=L.sequence_parallel,
        recompute_granularity=L.recompute,
        context_parallel_size=L.cp,
    )


@pytest.mark.parametrize("overrides", [PAPER_70B, NODE_8B], ids=["70b_480", "8b_64"])
def test_memory_matches_megatron_reference(overrides):
    tmu = pytest.importorskip("megatron.training.theoretical_memory_usage")
    report = check_fits(composed(*overrides))
    args = megatron_reference_args(report)
    ref_states = tmu.compute_weight_and_optimizer_memory(args)
    ref_act = tmu.compute_activation_memory(args, num_microbatches=report.layout.grad_accumulation)
    m = report.memory
    # Weights, fp32 grads and sharded optimizer state are exact arithmetic: identical.
    assert m.weights + m.grads + m.optimizer == pytest.approx(ref_states, rel=1e-6)
    # Activations: our Llama-specific count (SwiGLU, GQA) vs Korthikanti's GPT formula in Megatron.
    assert m.activations == pytest.approx(ref_act, rel=0.15)


def test_paper_70b_layout_fits_80gb_and_counts():
    report = check_fits(composed(*PAPER_70B))
    d = report.as_dict()
    assert (d["world_size"], d["tp"], d["pp"], d["vp"], d["dp"]) == (480, 8, 4, 5, 15)
    assert d["grad_accumulation"] == 1440 // 15
    assert d["tokens_per_step"] == 1440 * 8192
    assert d["train_iterations"] == 84772  # ceil(1e12 / 11,796,480), as the engine counts
    assert report.fits and report.memory.total < 80 * GIB
    # Stage 0 of 4 holds 20 layers + the embedding: 70.55B / 32 model-parallel ranks, give or take the vocab.
    assert report.memory.params == pytest.approx(report.model.num_parameters() / 32, rel=0.05)


def test_parameters_and_flops_of_the_presets_by_hand():
    """The published sizes (the HF safetensors' totals) and a hand count of Llama 3.1 8B's model FLOPs."""
    m8, m70 = load_model_config("llama31_8b"), load_model_config("llama31_70b")
    assert m8.num_parameters() == 8_030_261_248
    assert m70.num_parameters() == 70_553_706_496
    layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336  # QKV (GQA: 1024-wide K and V), output, SwiGLU
    assert matmul_params(m8) == 32 * layer + 4096 * 128256  # the output layer; the input embedding is a lookup
    assert attention_flops_per_token(m8, 8192) == 12 * 32 * 4096 * 8192
    assert attention_flops_per_token(m8, 8192, causal=True) == 6 * 32 * 4096 * 8192
    assert flops_per_token(m8, 8192) == 6 * (32 * layer + 4096 * 128256) + 12 * 32 * 4096 * 8192
    assert flops_per_token(m8, 8192) == pytest.approx(57.9e9, rel=1e-3)


def test_flops_match_paper_throughput():
    """The paper: ~817 tokens/s/GPU is ~345 TFLOP/s/GPU by 6*N*tokens (PAPER.md)."""
    report = check_fits(composed(*PAPER_70B))
    six_n = 6 * matmul_params(report.model) * 817 / 1e12
    assert six_n == pytest.approx(345, rel=0.15)
    # With the attention term (PaLM's convention) the same throughput is more model FLOPs.
    with_attention = flops_per_token(report.model, 8192) * 817 / 1e12
    assert six_n < with_attention < 1.25 * six_n


def test_oversized_layout_refused_with_numbers():
    cfg = composed(
        *PAPER_70B,
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "parallel.virtual_pipeline_model_parallel_size=null",
    )
    report = check_fits(cfg)
    assert not report.fits
    msg = report.refusal()
    assert "TP1 PP1" in msg and "80 GB" in msg
    assert f"{report.memory.total / GIB:.1f} GiB" in msg


def test_invalid_layout_names_the_field():
    with pytest.raises(LayoutError, match="tensor_model_parallel_size=3"):
        check_fits(composed(*PAPER_70B, "parallel.tensor_model_parallel_size=3"))
    with pytest.raises(LayoutError, match="global_batch_size"):
        check_fits(composed(*PAPER_70B, "train.global_batch_size=1000"))


def test_recompute_and_sequence_parallel_lower_memory():
    base = check_fits(composed(*NODE_8B, "cluster.accelerator=gpu")).memory.activations
    no_sp = check_fits(composed(*NODE_8B, "parallel.sequence_parallel=false")).memory.activations
    full = check_fits(composed(*NODE_8B, "parallel.recompute_granularity=full")).memory.activations
    assert full < base < no_sp


def test_enumerate_layouts_includes_paper_layout():
    report = check_fits(composed(*PAPER_70B))
    layouts = {(layout.tp, layout.pp, layout.cp) for layout in enumerate_layouts(report.layout)}
    assert (8, 4, 1) in layouts and (4, 8, 1) in layouts
    assert all(480 % (tp * pp * cp) == 0 for tp, pp, cp in layouts)


def test_plan_cli_exit_codes():
    ok = call_tool("tools/plan.py", *PAPER_70B)
    assert ok.returncode == 0, ok.stderr
    assert "480 = 60 nodes x 8" in ok.stdout and "fits" in ok.stdout
    # The run's LR curve from Megatron's scheduler: optim=cpt_70b's peak after 1% of 84,772 iterations.
    assert "learning rate (cosine, Megatron's scheduler) over 84,772 iterations" in ok.stdout
    assert "iteration       848  lr 1.500e-05  peak (end of warmup)" in ok.stdout
    bad = call_tool(
        "tools/plan.py",
        *PAPER_70B,
        "parallel.pipeline_model_parallel_size=1",
        "parallel.virtual_pipeline_model_parallel_size=null",
        "parallel.tensor_model_parallel_size=1",
    )
    assert bad.returncode == 1 and "REFUSED" in bad.stderr
    listing = call_tool("tools/plan.py", "--list-layouts", *PAPER_70B)
    assert listing.returncode == 0 and "TP8 PP4 VP5 CP1 DP15" in listing.stdout


def test_recipe_refuses_oversized_layout_before_launch(tmp_path):
    """The same check runs in recipes/cpt.py (and so before every Slurm launch and sweep point)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/cpt.py",
            "model=llama31_70b",
            "parallel=single",
            "train=paper",
            "cluster=slurm_h100",
            "launch=none",
            f"run_dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    report = check_fits(composed("model=llama31_70b", "parallel=single", "train=paper", "cluster=slurm_h100"))
    assert not report.fits
    assert (
        f"does not fit the GPU: layout TP1 PP1 CP1 DP480 of llama31_70b needs {report.memory.total / GIB:.1f} GiB"
        in proc.stderr
    )
    assert "the GPU has 80 GB (cluster.gpu_memory_gb)" in proc.stderr
    assert "ELLAMA_CONFIG=" not in proc.stdout and not (run_dir / "config.yaml").exists()


def test_recipe_accepts_fitting_layout_and_skips_check_without_gpu_limit(tmp_path, domain_data):
    from conftest import data_overrides

    for name, overrides in (("paper70b", PAPER_70B), ("cpu", ["model=llama31_70b", "parallel=single", "train=paper"])):
        run_dir = tmp_path / name
        proc = subprocess.run(
            [
                sys.executable,
                "recipes/cpt.py",
                *overrides,
                *data_overrides(domain_data),
                "launch=none",
                f"run_dir={run_dir}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr  # cluster=local_cpu has gpu_memory_gb=null: no memory check
        assert f"ELLAMA_CONFIG={run_dir / 'config.yaml'}" in proc.stdout
