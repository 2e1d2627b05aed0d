"""The pre-launch check: does the configured layout fit the GPU? One report used by
tools/plan.py, the Slurm dry run and recipes/cpt.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.config import flops_per_step, flops_per_token
from ellama_megatron.plan.layouts import Layout, _get, layout_from_cfg, validate
from ellama_megatron.plan.memory import GIB, MemoryEstimate, estimate_memory


@dataclasses.dataclass(frozen=True)
class PlanReport:
    model: LlamaConfig
    layout: Layout
    memory: MemoryEstimate
    gpu_memory_gb: float | None  # the limit checked against (GB as GPU vendors count: 80 GB H100 = 80 GiB usable-ish)
    gpu_peak_tflops: float | None

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gb is None or self.memory.total <= self.gpu_memory_gb * GIB

    @property
    def flops_per_step(self) -> float:
        return flops_per_step(self.model, self.layout.seq_length, self.layout.tokens_per_step)

    def as_dict(self) -> dict[str, Any]:
        L = self.layout
        return {
            "model": self.model.name,
            "world_size": L.world_size,
            "nodes": L.nodes,
            "procs_per_node": L.procs_per_node,
            "tp": L.tp,
            "pp": L.pp,
            "vp": L.vp,
            "cp": L.cp,
            "dp": L.dp,
            "sequence_parallel": L.sequence_parallel,
            "recompute": L.recompute,
            "micro_batch_size": L.micro_batch_size,
            "global_batch_size": L.global_batch_size,
            "grad_accumulation": L.grad_accumulation,
            "seq_length": L.seq_length,
            "tokens_per_step": L.tokens_per_step,
            "train_iterations": L.train_iterations,
            "params_per_gpu": self.memory.params,
            "memory_gib": {k: round(v, 2) for k, v in self.memory.as_gib().items()},
            "memory_stage": self.memory.stage,
            "gpu_memory_gb": self.gpu_memory_gb,
            "fits": self.fits,
            "model_tflops_per_step": round(self.flops_per_step / 1e12, 1),
            "model_gflops_per_token": round(flops_per_token(self.model, L.seq_length) / 1e9, 2),
        }

    def table(self) -> str:
        d = self.as_dict()
        m = d["memory_gib"]
        limit = f"{self.gpu_memory_gb:g} GB" if self.gpu_memory_gb else "no limit (cluster.gpu_memory_gb=null)"
        vp = f" (VP {d['vp']})" if d["vp"] else ""
        rows = [
            ("model", f"{d['model']} ({self.model.num_parameters() / 1e9:.2f}B parameters)"),
            ("world size", f"{d['world_size']} = {d['nodes']} nodes x {d['procs_per_node']}"),
            ("TP / PP / CP / DP", f"{d['tp']} / {d['pp']}{vp} / {d['cp']} / {d['dp']}"),
            ("sequence parallel, recompute", f"{d['sequence_parallel']}, {d['recompute']}"),
            ("micro / global batch", f"{d['micro_batch_size']} / {d['global_batch_size']} sequences of {d['seq_length']}"),
            ("gradient accumulation", f"{d['grad_accumulation']} micro-batches per step per DP rank"),
            ("tokens per step", f"{d['tokens_per_step']:,}"),
            ("iterations for the token budget", f"{d['train_iterations']:,}"),
            ("model FLOPs per step", f"{d['model_tflops_per_step']:,.1f} TFLOP ({d['model_gflops_per_token']} GFLOP/token)"),
            ("parameters on the busiest GPU", f"{d['params_per_gpu'] / 1e9:.3f}B ({d['memory_stage']} pipeline stage)"),
            ("  weights", f"{m['weights']:.2f} GiB"),
            ("  gradients", f"{m['grads']:.2f} GiB"),
            ("  optimizer state", f"{m['optimizer']:.2f} GiB"),
            ("  activations", f"{m['activations']:.2f} GiB"),
            ("  allowance", f"{m['allowance']:.2f} GiB"),
            ("memory per GPU", f"{m['total']:.2f} GiB of {limit}: {'fits' if self.fits else 'DOES NOT FIT'}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def refusal(self) -> str:
        m = self.memory.as_gib()
        return (
            f"layout {self.layout.describe()} of {self.model.name} needs {m['total']:.1f} GiB per GPU "
            f"(weights {m['weights']:.1f} + grads {m['grads']:.1f} + optimizer {m['optimizer']:.1f} + "
            f"activations {m['activations']:.1f} + allowance {m['allowance']:.1f}) but the GPU has "
            f"{self.gpu_memory_gb:g} GB (cluster.gpu_memory_gb); raise parallel.tensor_model_parallel_size "
            "or pipeline_model_parallel_size, use parallel.recompute_granularity=selective/full, or "
            "lower train.micro_batch_size (python tools/plan.py --list-layouts shows layouts that fit)"
        )


def model_from_cfg(cfg: Any) -> LlamaConfig:
    model = cfg.model if not isinstance(cfg, dict) else cfg["model"]
    if isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    return LlamaConfig.from_dict(dict(model), source="config model")


def plan(cfg: Any) -> PlanReport:
    """Validate the layout (LayoutError names the field) and estimate it."""
    model = model_from_cfg(cfg)
    layout = layout_from_cfg(cfg)
    validate(layout, model)
    return report_for(model, layout, _get(cfg, "cluster.gpu_memory_gb"), _get(cfg, "cluster.gpu_peak_tflops"))


def report_for(model: LlamaConfig, layout: Layout, gpu_memory_gb: float | None, gpu_peak_tflops: float | None = None) -> PlanReport:
    return PlanReport(model, layout, estimate_memory(model, layout), gpu_memory_gb, gpu_peak_tflops)


def check_fits(cfg: Any) -> PlanReport:
    """The pre-launch check: a PlanReport; `report.fits` False means refuse with `report.refusal()`.

    Raises LayoutError (a ValueError) for a layout Megatron cannot run at all.
    """
    return plan(cfg)
