"""Reads Megatron's training log: losses per iteration, per-domain training losses (ours,
engine/domain_loss.py) and per-domain validation losses.

Tests, the Slurm sweep table and the report's curves read runs through this, not through regexes
of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TRAIN = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([0-9.Ee+-]+) \|")
_ITERATION_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| elapsed time per iteration \(ms\): ([0-9.]+) \|")
_LR = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| learning rate: ([0-9.Ee+-]+) \|")
# " iteration       20 | lm loss by group | general: 5.123456789E+00 (1024 tokens) | ecommerce: ... |"
# Not anchored to the line's ends: another rank writing at the same moment can share the line.
_DOMAIN_TRAIN = re.compile(r"iteration\s+(\d+) \| lm loss by (\w+) \| ([^\n]*)")
_DOMAIN_CELL = re.compile(r"(\S+): ([0-9.Ee+-]+) \((\d+) tokens\)")
# " validation-general loss at iteration 20 | lm loss value: 5.85E+00 | ..." (periodic) and
# " validation-general loss at iteration 20 on validation set | ..." (the final pass)
_VALID = re.compile(r"validation-(\S+) loss at iteration (\d+)( on validation set)? \| lm loss value: ([0-9.Ee+-]+)")


@dataclass
class TrainLog:
    train_loss: dict[int, float] = field(default_factory=dict)  # iteration -> lm loss
    learning_rate: dict[int, float] = field(default_factory=dict)  # iteration -> LR Megatron logged there
    iteration_ms: dict[int, float] = field(
        default_factory=dict
    )  # iteration -> its wall time (mean over the log interval)
    valid_loss: dict[str, dict[int, float]] = field(default_factory=dict)  # domain -> iteration -> loss
    final_valid_loss: dict[str, float] = field(default_factory=dict)  # domain -> loss of the end-of-run pass
    # logging.train_loss_by: level (group, source) -> domain -> iteration -> loss over the log interval,
    # and the tokens it is the mean of
    domain_train_loss: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    domain_train_tokens: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    train_iters: int | None = None

    @property
    def last_iteration(self) -> int:
        return max(self.train_loss, default=0)


def parse_train_log(text: str) -> TrainLog:
    log = TrainLog()
    for m in _TRAIN.finditer(text):
        log.train_loss[int(m.group(1))] = float(m.group(3))
        log.train_iters = int(m.group(2))
    for m in _LR.finditer(text):
        log.learning_rate[int(m.group(1))] = float(m.group(2))
    for m in _ITERATION_MS.finditer(text):
        log.iteration_ms[int(m.group(1))] = float(m.group(2))
    for m in _DOMAIN_TRAIN.finditer(text):
        iteration, level = int(m.group(1)), m.group(2)
        for cell in _DOMAIN_CELL.finditer(m.group(3)):
            log.domain_train_loss.setdefault(level, {}).setdefault(cell.group(1), {})[iteration] = float(cell.group(2))
            log.domain_train_tokens.setdefault(level, {}).setdefault(cell.group(1), {})[iteration] = int(cell.group(3))
    for m in _VALID.finditer(text):
        domain, iteration, loss = m.group(1), int(m.group(2)), float(m.group(4))
        if m.group(3):  # the end-of-run pass; a periodic pass at the same iteration is kept
            log.final_valid_loss[domain] = loss
            log.valid_loss.setdefault(domain, {}).setdefault(iteration, loss)
        else:
            log.valid_loss.setdefault(domain, {})[iteration] = loss
    return log


def compact_line(line: str) -> str | None:
    """A short form of a training or validation log line for progress output; None for other lines."""
    m = _TRAIN.search(line)
    if m:
        return f"iteration {int(m.group(1)):>6}/{m.group(2)}  lm loss {float(m.group(3)):.4f}"
    m = _VALID.search(line)
    if m:
        final = " (final)" if m.group(3) else ""
        return f"iteration {int(m.group(2)):>6}  validation {m.group(1):<12} {float(m.group(4)):.4f}{final}"
    return None
