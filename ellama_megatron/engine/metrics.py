"""One sink for every metric the engine adds to Megatron's log, and the interval metrics that feed it.

Megatron logs its own numbers (loss, LR, grad norm, TFLOP/s, validation) from ``training_log``.
What we add (tokens/s, the training loss per domain, stragglers) goes through ``MetricsSink.write``:
a dict of scalars and the text lines that say the same, to the train log (stdout of the last rank,
where Megatron logs), TensorBoard and W&B (Megatron's own writers, which exist on that rank only).
The line formats and scalar names are formats/train_log.py's.

An ``IntervalMetric`` is told when each iteration ends (every rank, every iteration) and reports at
each log interval (every rank: a report may be a collective); engine/megatron_hooks.py calls them
from Megatron's ``training_log`` in a fixed order and hands their reports to the sink.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from ellama_megatron.formats.train_log import TOKENS_PER_SECOND_TAG, tokens_per_second_line


@dataclass
class Report:
    """What a metric has to say at one log interval."""

    scalars: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


class IntervalMetric(Protocol):
    def end_iteration(self, iteration: int, skipped: bool) -> None:
        """Every rank, after every iteration (``skipped``: the optimizer did not step)."""

    def report(self, iteration: int, first_of_launch: bool) -> Report | None:
        """Every rank, at each log interval, in the same order on all ranks (collectives allowed)."""


class MetricsSink:
    """Writes scalars and lines where Megatron writes its own: on the last rank only."""

    def write(self, iteration: int, report: Report) -> None:
        from megatron.training import training

        if not training.is_last_rank():
            return
        if report.lines:
            # One write: print() writes text and newline apart, and another rank's output landing
            # between them would join two lines.
            sys.stdout.write("".join(line + "\n" for line in report.lines))
            sys.stdout.flush()
        if not report.scalars:
            return
        writer = training.get_tensorboard_writer()
        if writer:
            for tag, value in report.scalars.items():
                writer.add_scalar(tag, value, iteration)
        wandb_writer = training.get_wandb_writer()
        if wandb_writer:
            wandb_writer.log(report.scalars, iteration)


class TokensPerSecond:
    """Tokens per second per GPU over each log interval: the unit continued-pretraining budgets are
    written in (Megatron logs model TFLOP/s, not tokens/s)."""

    def __init__(self, global_batch_size: int, seq_length: int, world_size: int):
        self.tokens_per_iteration = global_batch_size * seq_length
        self.world_size = world_size
        self._since: tuple[float, int] | None = None

    def end_iteration(self, iteration: int, skipped: bool) -> None:
        pass

    def report(self, iteration: int, first_of_launch: bool) -> Report | None:
        now, since = time.time(), self._since
        self._since = (now, iteration)
        if since is None or iteration <= since[1]:
            return None
        per_gpu = (iteration - since[1]) * self.tokens_per_iteration / (now - since[0]) / self.world_size
        return Report({TOKENS_PER_SECOND_TAG: per_gpu}, [tokens_per_second_line(iteration, per_gpu)])
