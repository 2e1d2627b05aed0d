"""Evaluation: per-domain perplexity, an e-commerce task suite for lm-evaluation-harness, merge sweeps, training curves."""
