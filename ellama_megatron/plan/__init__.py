"""Parallelism and memory planner: per-GPU memory and model FLOPs of a Megatron layout, and the
pre-launch check `check_fits(cfg)`. Formulas: docs/planner.md."""

from ellama_megatron.plan.check import PlanReport, check_fits
from ellama_megatron.plan.layouts import Layout, LayoutError, enumerate_layouts, train_iterations

__all__ = ["PlanReport", "check_fits", "Layout", "LayoutError", "enumerate_layouts", "train_iterations"]
