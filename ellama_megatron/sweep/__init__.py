"""Hydra multirun sweeps on Slurm (recipes/sweep.py): one job per point, and the table of results."""

from ellama_megatron.sweep.table import SweepTableCallback, collect_sweep, write_tables

__all__ = ["SweepTableCallback", "collect_sweep", "write_tables"]
