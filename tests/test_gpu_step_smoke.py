"""benchmarks/gpu_step.py: its planner-sized layer counts, bad input, and a --tiny run on CPU. Its FLOPs
and parameter count are ellama_megatron.llama.config's (tested in test_planner.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO

from ellama_megatron.run.memory import estimate_memory

SCRIPT = REPO / "benchmarks" / "gpu_step.py"


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module
    spec.loader.exec_module(module)
    return module


def test_step_flops_of_9_layers_at_8b_widths():
    """The benchmark's step at 8B widths cut to 9 layers: every layer-dependent term scales by 9/32."""
    gpu_step = _gpu_step()
    args = gpu_step.parse_args(["--model", "llama31_8b", "--layers", "9", "--seq", "8192"])
    args.dtype = "bf16"
    plan = gpu_step.step_plan(gpu_step.model_from_args(args), 9, args)
    flops = gpu_step.training_flops_per_token(plan)
    layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336  # QKV (GQA: 1024-wide K and V), output, SwiGLU
    assert flops["dense"] == 6 * (9 * layer + 4096 * 128256)
    assert flops["attn_causal"] == 6 * 9 * 4096 * 8192
    assert flops["palm"] == flops["dense"] + 12 * 9 * 4096 * 8192
    assert plan.tokens_per_step == 8192 and plan.grad_accumulation == 1


def test_peak_lookup_and_auto_layers():
    gpu_step = _gpu_step()
    assert gpu_step.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops_for("NVIDIA H200") == 989.0
    assert gpu_step.peak_tflops_for("Some GPU") is None
    args = gpu_step.parse_args(["--model", "llama31_8b"])
    args.dtype = "bf16"
    model_cfg = gpu_step.model_from_args(args)
    on_h100 = gpu_step.layers_that_fit(model_cfg, args, 80 * 2**30)
    on_h200 = gpu_step.layers_that_fit(model_cfg, args, 141 * 2**30)
    # docs/gpu_speed.md's table: 9 and 21 layers at seq 8192 without recompute.
    assert (on_h100, on_h200) == (9, 21)
    fits = estimate_memory(gpu_step.step_plan(model_cfg, on_h100, args)).total
    over = estimate_memory(gpu_step.step_plan(model_cfg, on_h100 + 1, args)).total
    assert fits <= 80 * 2**30 < over


@pytest.mark.slow
def test_tiny_step_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        # bf16: the GPU path (Float16Module, Megatron's bf16 optimizer with fp32 main params).
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--dtype", "bf16", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_step: 2 x tiny layers") and "tokens/s" in last
    result = json.loads(out.read_text())
    assert not (tmp_path / "result.json.tmp").exists()
    assert result["shape"]["layers"] == 2 and result["shape"]["seq"] == 64
    assert result["parameters"] == 2 * (64 * 128 + 64 * 64 + 3 * 64 * 160 + 2 * 64) + 2 * 512 * 64 + 64
    assert result["attention"] == "sdpa" and result["optimizer"] == "megatron" and result["dtype"] == "bf16"
    assert len(result["step_s_all"]) == 2 and result["tokens_per_s"] > 0
    # log(512) = 6.24: random weights predict random tokens at chance.
    assert result["final_loss"] == pytest.approx(6.24, abs=0.1)
    assert result["mfu"] is None  # no GPU peak on a CPU
    flops = result["model_tflops"] * 1e12 / result["tokens_per_s"]
    assert flops > result["model_tflops_no_attention"] * 1e12 / result["tokens_per_s"]


def test_bad_input_is_refused_before_building():
    gpu_step = _gpu_step()
    with pytest.raises(SystemExit, match="--layers must be 'auto' or a positive integer"):
        gpu_step.main(["--layers", "zero", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown model preset"):
        gpu_step.main(["--model", "llama99", "--layers", "1", "--device", "cpu"])
