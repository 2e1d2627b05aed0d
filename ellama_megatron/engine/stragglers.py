"""Stragglers: each rank's compute time per step, up to the gradient reduction, compared across ranks.

In data-parallel training every rank waits for the slowest at the gradient reduction, so a slow GPU
or host (thermal throttling, a bad PCIe link, a noisy neighbour) slows the whole job while every
rank's *step* time looks the same. What differs is the time each rank spends before it reaches the
reduction: from the start of ``train_step`` to Megatron's ``finalize_model_grads`` (called once per
step, after the last micro-batch's backward). On a GPU both ends are CUDA events, read once per log
interval (no host sync per step); on a CPU, the wall clock.

At each log interval every rank's mean over the interval is gathered (one all-gather of a float):
the slowest rank, its node, and its ratio to the median go to the train log and TensorBoard; a
rank that stays above ``logging.straggler_factor`` times the median for
``logging.straggler_intervals`` intervals in a row is appended to ``events.jsonl`` (report only:
nothing is stopped or excluded; that is the fault policies' job).

With overlapped gradient reduction (GPU) part of the reduction runs during the backward, so the
figure is the compute up to the last bucket's reduction: still what tells ranks apart.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch

from ellama_megatron.engine.metrics import Report
from ellama_megatron.formats.train_log import STRAGGLER_MS_TAG, STRAGGLER_RATIO_TAG, straggler_line


class StragglerClock:
    def __init__(self, factor: float, intervals: int, run_dir: str | None, on_gpu: bool):
        self.factor, self.intervals, self.run_dir, self.on_gpu = factor, intervals, run_dir, on_gpu
        self._start = None
        self._pending: list[tuple] = []  # this interval's (start, end) marks
        self._nodes: list[str] | None = None
        self._slow_streak: dict[int, int] = {}  # rank -> consecutive intervals above the factor

    def _mark(self):
        if self.on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step_started(self) -> None:
        self._start = self._mark()

    def compute_ended(self) -> None:
        if self._start is not None:
            self._pending.append((self._start, self._mark()))
            self._start = None

    def end_iteration(self, iteration: int, skipped: bool) -> None:
        pass

    def _interval_ms(self) -> float:
        if not self._pending:
            return 0.0
        if self.on_gpu:
            self._pending[-1][1].synchronize()
            total = sum(start.elapsed_time(end) for start, end in self._pending)
        else:
            total = sum(end - start for start, end in self._pending) * 1000.0
        mean = total / len(self._pending)
        self._pending.clear()
        return mean

    def report(self, iteration: int, first_of_launch: bool) -> Report | None:
        import torch.distributed as dist

        if self._nodes is None:  # once per launch: which node each rank runs on
            self._nodes = [None] * dist.get_world_size()
            dist.all_gather_object(self._nodes, socket.gethostname())
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        mine = torch.tensor([self._interval_ms()], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        per_rank = [float(t.item()) for t in gathered]
        if not any(per_rank):
            return None  # an interval without a step (all skipped)
        median = statistics.median(per_rank)
        slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
        self._record_streaks(iteration, per_rank, median)
        ratio = per_rank[slowest] / median if median else 1.0
        return Report(
            {
                STRAGGLER_RATIO_TAG: ratio,
                STRAGGLER_MS_TAG.format(which="slowest"): per_rank[slowest],
                STRAGGLER_MS_TAG.format(which="median"): median,
            },
            [straggler_line(iteration, slowest, self._nodes[slowest], per_rank[slowest], median)],
        )

    def _record_streaks(self, iteration: int, per_rank: list[float], median: float) -> None:
        """Count, per rank, the intervals in a row above the factor; log a sustained one once per streak."""
        import torch.distributed as dist

        for rank, ms in enumerate(per_rank):
            slow = median > 0 and ms > self.factor * median
            self._slow_streak[rank] = self._slow_streak.get(rank, 0) + 1 if slow else 0
            if self._slow_streak[rank] == self.intervals and dist.get_rank() == 0 and self.run_dir:
                from ellama_megatron.run.events import append_event

                append_event(
                    self.run_dir,
                    "straggler",
                    iteration=iteration,
                    node=self._nodes[rank],
                    action="reported (logging.straggler_factor); nothing stopped",
                    rank=rank,
                    compute_ms=round(ms, 3),
                    median_ms=round(median, 3),
                    ratio=round(ms / median, 3),
                    intervals=self.intervals,
                )
