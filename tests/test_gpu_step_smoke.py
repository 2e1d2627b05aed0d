"""benchmarks/gpu_step.py: its FLOP formula against the planner's, and a --tiny run on CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ellama_megatron.llama.config import flops_per_token

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_step.py"


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset,layers", [("llama31_8b", 32), ("llama31_70b", 80), ("llama31_8b", 9)])
def test_flops_match_the_planner_and_hand_count(preset, layers):
    gpu_step = _gpu_step()
    args = gpu_step.parse_args(["--model", preset, "--layers", str(layers), "--seq", "8192"])
    model_cfg, shape = gpu_step.shape_from_args(args)
    flops = gpu_step.training_flops_per_token(shape)
    # The planner counts PaLM's way: dense matmuls plus the full s x s attention square.
    planner = flops_per_token(dataclasses.replace(model_cfg, num_layers=layers), 8192)
    assert flops["dense"] + flops["attn_full"] == pytest.approx(planner, rel=1e-12)
    assert flops["attn_causal"] * 2 == flops["attn_full"]
    if preset == "llama31_8b" and layers == 32:
        # Hand count for Llama 3.1 8B: 6 x 7.50e9 matmul params + 12 x 32 x 4096 x 8192.
        assert flops["dense"] == 6 * (32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) + 4096 * 128256)
        assert flops["attn_full"] == 12 * 32 * 4096 * 8192
        assert flops["dense"] + flops["attn_full"] == pytest.approx(57.9e9, rel=1e-3)


def test_peak_lookup_and_auto_layers():
    gpu_step = _gpu_step()
    assert gpu_step.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops_for("NVIDIA H200") == 989.0
    assert gpu_step.peak_tflops_for("Some GPU") is None
    args = gpu_step.parse_args(["--model", "llama31_8b"])
    args.dtype = "bf16"
    model_cfg, shape = gpu_step.shape_from_args(args)
    on_h100 = gpu_step.layers_that_fit(model_cfg, shape, args, 80 * 2**30)
    on_h200 = gpu_step.layers_that_fit(model_cfg, shape, args, 141 * 2**30)
    assert 1 <= on_h100 < on_h200 <= 32
    fits = gpu_step.planned_memory_bytes(model_cfg, dataclasses.replace(shape, layers=on_h100), args)
    over = gpu_step.planned_memory_bytes(model_cfg, dataclasses.replace(shape, layers=on_h100 + 1), args)
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
