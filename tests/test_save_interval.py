"""The save interval against the failure rate (Young/Daly, docs/planner.md): RunPlan's figures for the
70B paper preset against a computation by hand, checkpoint.save_interval=auto in Megatron's
arguments, what tools/plan.py and the dry run print, and the refusals of bad values."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from conftest import PAPER_70B, REPO, call_tool, composed, data_overrides

from ellama_megatron.engine.megatron_args import megatron_argv
from ellama_megatron.launch.prepare import prepare
from ellama_megatron.run.plan import RunPlan, lost_fraction, young_daly_seconds
from ellama_megatron.run.schema import ConfigError

# Llama 3.1 70B (conf/model/llama31_70b.yaml), written out so the figures below are checked by hand.
H, FFN, LAYERS, HEADS, GROUPS, HEAD_DIM, VOCAB = 8192, 28672, 80, 64, 8, 128, 128256
PADDED_VOCAB = 129024  # a multiple of 128 x TP 8
SEQ, TOKENS_PER_STEP, NODES, GPUS = 8192, 1440 * 8192, 60, 480


def hand_figures() -> dict[str, float]:
    """The 70B paper preset (60 nodes of 8 H100) with conf/cluster/slurm_h100.yaml's defaults."""
    per_layer = H * (HEADS * HEAD_DIM + 2 * GROUPS * HEAD_DIM) + HEADS * HEAD_DIM * H + 3 * H * FFN + 2 * H
    params = LAYERS * per_layer + 2 * PADDED_VOCAB * H + H  # untied embedding and output layer, padded
    checkpoint = params * (2 + 4 + 4 + 4)  # bf16 weights, fp32 main params, Adam m and v
    save = checkpoint / (NODES * 1.0e9)  # 1 GB/s per node
    mtbf = 6335 * 3600 / NODES  # seconds
    matmul = LAYERS * (per_layer - 2 * H) + VOCAB * H  # all but the input embedding and the norms
    flops_per_token = 6 * matmul + 12 * LAYERS * HEADS * HEAD_DIM * SEQ
    step = flops_per_token * TOKENS_PER_STEP / (GPUS * 989e12 * 0.40)
    optimum = math.sqrt(2 * save * mtbf)
    return {"checkpoint": checkpoint, "save": save, "mtbf": mtbf, "step": step, "optimum": optimum}


def test_paper_70b_figures_match_a_hand_computation():
    plan = RunPlan.from_cfg(composed(*PAPER_70B))
    hand = hand_figures()
    assert plan.checkpoint_bytes == hand["checkpoint"] == 987_928_051_712
    assert plan.save_seconds == pytest.approx(hand["save"], rel=1e-12)  # 16.5 s
    assert plan.job_mtbf_seconds == pytest.approx(hand["mtbf"], rel=1e-12)  # 105.6 h
    assert plan.step_seconds == pytest.approx(hand["step"], rel=1e-12)  # 29.9 s
    assert plan.young_daly_seconds == pytest.approx(hand["optimum"], rel=1e-12)  # 59 min
    assert hand["optimum"] == pytest.approx(3537.9, abs=0.1)
    assert plan.young_daly_iterations == round(hand["optimum"] / hand["step"]) == 118
    # The preset's 1,000 iterations (8.3 h) lose 4% to saves and rework; the optimum 0.93%.
    at_1000 = hand["save"] / (1000 * hand["step"]) + 1000 * hand["step"] / (2 * hand["mtbf"])
    assert plan.lost_fraction(1000) == pytest.approx(at_1000, rel=1e-12)
    assert at_1000 == pytest.approx(0.0399, abs=1e-4)
    assert plan.save_interval == 1000  # conf/checkpoint/default.yaml: a number is taken as given


def test_defaults_reproduce_their_sources():
    """cluster.node_mtbf_hours is Llama 3's 419 unexpected interruptions in 54 days on 2,048 nodes;
    cluster.expected_mfu makes the 70B step run at the paper's ~817 tokens/s per GPU."""
    plan = RunPlan.from_cfg(composed(*PAPER_70B))
    assert plan.node_mtbf_hours == pytest.approx(54 * 24 * 2048 / 419, rel=1e-3)
    assert plan.tokens_per_step / plan.step_seconds / plan.world_size == pytest.approx(817, rel=0.01)


def test_young_daly_interval_minimises_the_lost_time():
    save, mtbf = 16.5, 380_100.0
    optimum = young_daly_seconds(save, mtbf)
    best = lost_fraction(optimum, save, mtbf)
    assert best == pytest.approx(math.sqrt(2 * save / mtbf), rel=1e-12)  # save share = rework share
    assert all(lost_fraction(optimum * k, save, mtbf) > best for k in (0.5, 0.9, 1.1, 2.0))


def test_auto_is_the_megatron_save_interval():
    cfg = composed(*PAPER_70B, "checkpoint.save_interval=auto")
    plan = RunPlan.from_cfg(cfg)
    argv = megatron_argv(cfg, plan.model, "transformer_engine")
    assert argv[argv.index("--save-interval") + 1] == "118" == str(plan.save_interval)
    # With keep_every, auto takes the divisor of keep_every that loses the least time: of 5000's
    # divisors around 118, 125 loses 0.932% and 100 0.944%.
    kept = composed(*PAPER_70B, "checkpoint.save_interval=auto", "checkpoint.keep_every=5000")
    plan = RunPlan.from_cfg(kept)
    argv = megatron_argv(kept, plan.model, "transformer_engine")
    assert argv[argv.index("--save-interval") + 1] == "125"
    assert plan.lost_fraction(125) < plan.lost_fraction(100) < plan.lost_fraction(250)
    # A longer run on fewer nodes fails less often: the interval grows with sqrt(MTBF).
    fewer = RunPlan.from_cfg(composed(*PAPER_70B, "checkpoint.save_interval=auto", "cluster.node_mtbf_hours=25340"))
    assert fewer.young_daly_seconds == pytest.approx(2 * plan.young_daly_seconds, rel=1e-12)


def test_checkpoint_size_follows_precision_and_optimizer_state():
    tiny = RunPlan.from_cfg(composed())  # local_cpu: fp32 weights, distributed optimizer
    assert tiny.checkpoint_bytes_per_parameter == 4 + 4 + 8  # its fp32_param is saved besides the weights
    assert RunPlan.from_cfg(composed("checkpoint.save_optim=false")).checkpoint_bytes_per_parameter == 4
    plain = RunPlan.from_cfg(composed("parallel.use_distributed_optimizer=false"))
    assert plain.checkpoint_bytes_per_parameter == 4 + 8  # fp32 weights are the plain optimizer's own
    assert RunPlan.from_cfg(composed(*PAPER_70B, "checkpoint.save_optim=false")).checkpoint_bytes_per_parameter == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("cluster.node_mtbf_hours=0", "cluster.node_mtbf_hours=0.0 must be positive"),
        ("cluster.checkpoint_write_gb_per_s=-1", "cluster.checkpoint_write_gb_per_s=-1.0 must be positive"),
        ("cluster.expected_mfu=1.5", "cluster.expected_mfu=1.5 must be in (0, 1]"),
        ("checkpoint.save_interval=often", "checkpoint.save_interval='often' must be a number of iterations or auto"),
        ("checkpoint.save_interval=0", "checkpoint.save_interval=0 must be at least 1"),
        (
            "checkpoint.save_interval=auto",  # local_cpu: no GPU peak, no MFU, no step time
            "checkpoint.save_interval=auto needs the step time and the save time, but cluster.gpu_peak_tflops "
            "and cluster.expected_mfu are not set",
        ),
    ],
)
def test_bad_values_are_refused_by_key(override, message, domain_data, tmp_path):
    with pytest.raises(ConfigError) as refused:
        prepare(composed(f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data), override))
    assert message in str(refused.value)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_keep_every_with_auto_needs_only_to_be_positive(domain_data, tmp_path):
    base = [f"run_dir={tmp_path / 'run'}", *data_overrides(domain_data), *PAPER_70B, "checkpoint.save_interval=auto"]
    with pytest.raises(ConfigError, match=r"checkpoint.keep_every=0 must be at least 1"):
        prepare(composed(*base, "checkpoint.keep_every=0"))
    config = prepare(composed(*base, "checkpoint.keep_every=7"))  # no multiple of a number it cannot know
    assert "keep_every: 7" in config.read_text()
    plan = RunPlan.from_cfg(composed(*PAPER_70B, "checkpoint.save_interval=auto", "checkpoint.keep_every=7"))
    assert plan.save_interval == 7  # 7's divisors are 1 and 7; 7 is nearer the optimum


def test_plan_tool_and_dry_run_print_the_interval(domain_data, tmp_path):
    plan = RunPlan.from_cfg(composed(*PAPER_70B))
    expected = [
        "checkpoint 988 GB (14 bytes x 70.57B parameters): a save blocks about 16.5 s at 60 nodes x 1 GB/s "
        "(cluster.checkpoint_write_gb_per_s)",
        "job MTBF 105.6 h (cluster.node_mtbf_hours=6335 / 60 nodes); a step about 29.9 s at cluster.expected_mfu=0.4",
        "Young/Daly save interval sqrt(2 x save x MTBF) = 59 min = 118 iterations",
        "save every 1,000 iterations (checkpoint.save_interval, 8.3 h): 4.0% of the time lost to saves and "
        "rework, 0.93% at the optimum",
    ]
    assert plan.save_interval_lines() == expected
    assert plan.summary_lines()[-4:] == expected  # what every launch prints
    tool = call_tool("tools/plan.py", *PAPER_70B)
    assert tool.returncode == 0, tool.stderr
    assert all(line in tool.stdout for line in expected)
    dry = subprocess.run(
        [
            sys.executable,
            "recipes/cpt.py",
            *PAPER_70B,
            *data_overrides(domain_data),
            "checkpoint.save_interval=auto",
            f"run_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ELLAMA_DRY_RUN": "1"},
    )
    assert dry.returncode == 0, dry.stderr
    assert "save every 118 iterations (checkpoint.save_interval=auto, 59 min): 0.93% of the time lost" in dry.stdout


def test_plan_tool_refuses_bad_values_with_one_line():
    proc = subprocess.run(
        [sys.executable, "tools/plan.py", *PAPER_70B, "cluster.node_mtbf_hours=-5", "cluster.expected_mfu=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cluster.node_mtbf_hours=-5.0 must be positive" in proc.stderr
    assert "cluster.expected_mfu=0.0 must be in (0, 1]" in proc.stderr
