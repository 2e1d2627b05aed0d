"""The training loss per domain (data group, or source), from the loss the step already computes.

Megatron logs one training loss, the blend's; its per-domain curves are validation only, at eval
intervals. Each training sample's source is known, though: Megatron's BlendedDataset hands every
sample over with the ``dataset_id`` of the blend entry it came from. The loss function adds each
sample's summed per-token loss and its token count into the column of its domain (an ``index_add``,
no extra forward); each logging iteration sums the columns over DP x CP, as Megatron sums its lm
loss, and logs loss = sum / tokens per domain, with the tokens, to the train log, TensorBoard and
W&B (Megatron's writers).

The domains are ``logging.train_loss_by``: ``group`` (data.groups: general, ecommerce) or
``source`` (the groups and each source, named ``<group>-<source>`` as validation sets are with
``data.valid_by=source``). An inline blend's entry names its group with a ``group`` key; without
one, the dataset's file name is its group.

A domain's figure covers the whole logging interval (a small batch may hold no sample of a domain
in one iteration), weighted by tokens; Megatron's lm loss is the mean of the interval's per-iteration
token means. With unmasked fixed-length samples (our GPT datasets), every iteration has the same
token count and the token-weighted mean of the domains is Megatron's lm loss. Like Megatron's, the
accumulator is not reset at a launch's first logged iteration and skips an iteration the optimizer
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ellama_megatron.engine.metrics import Report
from ellama_megatron.formats.train_log import DOMAIN_LOSS_TAG, DOMAIN_TOKENS_TAG, domain_loss_line
from ellama_megatron.run.schema import TRAIN_LOSS_LEVELS


def domain_names(entry: dict) -> tuple[str, str]:
    """(group, source) of one training-blend entry ({"prefix", "weight", "group"?, "source"?})."""
    group = entry.get("group") or Path(str(entry["prefix"])).name
    source = entry.get("source")
    return group, (f"{group}-{source}" if source else Path(str(entry["prefix"])).name)


@dataclass
class DomainLoss:
    """Per-domain sums of one run: ``names[level]`` and, per blend entry, its column at each level."""

    names: dict[str, list[str]]  # level -> domain names (columns)
    columns: dict[str, list[int]]  # level -> the column of each blend entry (its dataset_id)

    @classmethod
    def from_blend(cls, train: list[dict], train_loss_by: str | None) -> DomainLoss | None:
        """The domains of a training blend (resolve_blend's ``train``); None when off."""
        if train_loss_by is None:
            return None
        levels = TRAIN_LOSS_LEVELS[: TRAIN_LOSS_LEVELS.index(train_loss_by) + 1]  # source also logs the groups
        names: dict[str, list[str]] = {}
        columns: dict[str, list[int]] = {}
        for level in levels:
            per_entry = [domain_names(e)[TRAIN_LOSS_LEVELS.index(level)] for e in train]
            names[level] = list(dict.fromkeys(per_entry))
            columns[level] = [names[level].index(n) for n in per_entry]
        return cls(names, columns)

    def __post_init__(self):
        self._index: torch.Tensor | None = None  # dataset_id -> row of the accumulators, all levels stacked
        width = sum(len(n) for n in self.names.values())
        self.step = torch.zeros(width, 2, dtype=torch.float64)  # this iteration: (loss sum, tokens) per domain
        self.interval = torch.zeros(width, 2, dtype=torch.float64)  # since the last log line

    def _rows(self, dataset_id: torch.Tensor) -> list[torch.Tensor]:
        if self._index is None or self._index.device != dataset_id.device:
            offset, index = 0, []
            for level, cols in self.columns.items():
                index.append(torch.tensor(cols, dtype=torch.long) + offset)
                offset += len(self.names[level])
            self._index = torch.stack(index).to(dataset_id.device)  # [levels, blend entries]
            self.step = self.step.to(dataset_id.device)
            self.interval = self.interval.to(dataset_id.device)
        return list(self._index[:, dataset_id])

    def add(self, dataset_id: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor) -> None:
        """One micro-batch: ``losses`` and ``mask`` [samples, tokens], ``dataset_id`` [samples]."""
        per_sample = torch.stack([(losses * mask).sum(1), mask.sum(1)], dim=1).double()
        for rows in self._rows(dataset_id):
            self.step.index_add_(0, rows, per_sample)

    def end_iteration(self, iteration: int, skipped: bool) -> None:
        if not skipped:
            self.interval += self.step
        self.step.zero_()

    def reduce_interval(self, group) -> dict[str, dict[str, tuple[float, int]]]:
        """{level: {domain: (mean loss, tokens)}} over the interval and all DP x CP ranks (a
        collective: every rank of ``group`` calls it); domains without tokens are left out."""
        total = self.interval.clone()
        torch.distributed.all_reduce(total, group=group)
        values = total.tolist()
        out, row = {}, 0
        for level, names in self.names.items():
            out[level] = {
                n: (s / t, int(round(t))) for n, (s, t) in zip(names, values[row : row + len(names)]) if t > 0
            }
            row += len(names)
        return out

    def report(self, iteration: int, first_of_launch: bool) -> Report:
        """The interval's loss per domain, summed over DP x CP (a collective on every rank)."""
        from megatron.core import parallel_state as mpu

        levels = self.reduce_interval(mpu.get_data_parallel_group(with_context_parallel=True))
        if not first_of_launch:  # Megatron's own accumulator carries a launch's first iteration over too
            self.interval.zero_()
        report = Report()
        for level, losses in levels.items():
            report.lines.append(domain_loss_line(iteration, level, losses))
            for name, (loss, tokens) in losses.items():
                report.scalars[DOMAIN_LOSS_TAG.format(level=level, name=name)] = loss
                report.scalars[DOMAIN_TOKENS_TAG.format(level=level, name=name)] = tokens
        return report
