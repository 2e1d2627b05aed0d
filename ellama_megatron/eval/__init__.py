"""Evaluation: per-domain perplexity, an e-commerce task suite for lm-evaluation-harness, the merge curve,
training curves."""

from pathlib import Path

# lm-eval `--include_path` for the e-commerce task suite shipped with the package.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
