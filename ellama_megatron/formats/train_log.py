"""The training log, both ways: the lines and scalar names our metrics add to Megatron's log
(written through engine/metrics.py), and the parser of the whole text log (Megatron's own lines and
ours): losses per iteration, per-domain training and validation losses, throughput, stragglers,
checkpoint saves and loads.

The engine, the tests, the Slurm sweep table, the demo and the run report read runs through this,
not through regexes of their own.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# -- our scalars: TensorBoard / W&B names ---------------------------------------------------------
TOKENS_PER_SECOND_TAG = "tokens-per-sec-per-gpu"
DOMAIN_LOSS_TAG = "lm loss by {level}/{name}"  # one section per level, one curve per domain
DOMAIN_TOKENS_TAG = "tokens by {level}/{name}"
STRAGGLER_RATIO_TAG = "stragglers/slowest over median compute"
STRAGGLER_MS_TAG = "stragglers/{which} compute ms"  # slowest, median


def parse_domain_tag(tag: str) -> tuple[str, str, str] | None:
    """("loss" or "tokens", level, domain) of one of our per-domain scalar names; None for any other."""
    for kind, template in (("loss", DOMAIN_LOSS_TAG), ("tokens", DOMAIN_TOKENS_TAG)):
        head = template.split("{level}")[0]
        if tag.startswith(head) and "/" in tag:
            level, name = tag[len(head) :].split("/", 1)
            return kind, level, name
    return None


# -- our lines ------------------------------------------------------------------------------------
def tokens_per_second_line(iteration: int, per_gpu: float) -> str:
    return f" iteration {iteration:8d} | tokens per second per GPU: {per_gpu:.1f} |"


def domain_loss_line(iteration: int, level: str, losses: dict[str, tuple[float, int]]) -> str:
    """``losses``: domain -> (mean loss over the interval, tokens)."""
    cells = " | ".join(f"{name}: {loss:.9E} ({tokens} tokens)" for name, (loss, tokens) in losses.items())
    return f" iteration {iteration:8d} | lm loss by {level} | {cells} |"


def straggler_line(iteration: int, rank: int, node: str, slowest_ms: float, median_ms: float) -> str:
    """Per-rank compute time up to the gradient reduction, mean over the log interval."""
    return (
        f" iteration {iteration:8d} | stragglers | slowest rank {rank} on {node}: {slowest_ms:.1f} ms, "
        f"median {median_ms:.1f} ms, ratio {slowest_ms / median_ms if median_ms else 1.0:.2f} |"
    )


# -- the Slurm launcher's lines in the job log (launch/slurm.py, slurm/launch.sh) --------------------
def launcher_line(message: str) -> str:
    return f"[launch {time.strftime('%H:%M:%S')}] {message}"


def job_start_message(job: str, restart: int | str, nodes: int, per_node: int) -> str:
    """The first line a job's batch script logs (the run report reads the batch start from it)."""
    return f"job {job} restart {restart}: {nodes} nodes x {per_node} ranks"


def requeue_message(job: str, restart: int, iteration: int) -> str:
    return f"requeueing job {job} (restart {restart}) to resume from iteration {iteration}"


_REQUEUE = re.compile(r"requeueing job \S+ \(restart (\d+)\) to resume from iteration (\d+)")


def requeues(text: str) -> list[tuple[int, int]]:
    """(restart, iteration it resumes from) of every requeue a job log records."""
    return [(int(m.group(1)), int(m.group(2))) for m in _REQUEUE.finditer(text)]


_JOB_START = re.compile(r"\[launch (\d\d:\d\d:\d\d)\] job (\S+) restart (\d+):")


def job_starts(text: str) -> list[tuple[str, str, int]]:
    """(time of day, job, restart) of every job start in a job log, in order."""
    return [(m.group(1), m.group(2), int(m.group(3))) for m in _JOB_START.finditer(text)]


def split_by_job_start(text: str) -> list[str]:
    """A job log cut into its launches (the text after each job start line)."""
    return _JOB_START.split(text)[4::4]


# -- the parser -----------------------------------------------------------------------------------
# Megatron: " [2026-12-05 23:38:32.123456] iteration       20/     100 | ... | lm loss: 5.1E+00 | ..."
_TRAIN = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([0-9.Ee+-]+) \|")
_ITERATION_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| elapsed time per iteration \(ms\): ([0-9.]+) \|")
_ITERATION_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\] iteration\s+(\d+)/")
_LR = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| learning rate: ([0-9.Ee+-]+) \|")
# Ours, not anchored to the line's ends: another rank writing at the same moment can share the line.
_DOMAIN_TRAIN = re.compile(r"iteration\s+(\d+) \| lm loss by (\w+) \| ([^\n]*)")
_DOMAIN_CELL = re.compile(r"(\S+): ([0-9.Ee+-]+) \((\d+) tokens\)")
_TOKENS_PER_SECOND = re.compile(r"iteration\s+(\d+) \| tokens per second per GPU: ([0-9.]+) \|")
_STRAGGLER = re.compile(
    r"iteration\s+(\d+) \| stragglers \| slowest rank (\d+) on (\S+): ([0-9.]+) ms, median ([0-9.]+) ms, ratio"
)
# " validation-general loss at iteration 20 | lm loss value: 5.85E+00 | ..." (periodic) and
# " validation-general loss at iteration 20 on validation set | ..." (the final pass)
_VALID = re.compile(r"validation-(\S+) loss at iteration (\d+)( on validation set)? \| lm loss value: ([0-9.Ee+-]+)")
# Megatron's checkpoint lines (megatron/training/checkpointing.py)
_SAVING = re.compile(r"saving checkpoint at iteration\s+(\d+)")
_SAVED = re.compile(r"successfully saved checkpoint from iteration\s+(\d+)")
_LOADED = re.compile(r"successfully loaded checkpoint from .* at iteration (\d+)")


@dataclass
class Straggler:
    rank: int
    node: str
    slowest_ms: float
    median_ms: float

    @property
    def ratio(self) -> float:
        return self.slowest_ms / self.median_ms if self.median_ms else 1.0


@dataclass
class TrainLog:
    train_loss: dict[int, float] = field(default_factory=dict)  # iteration -> lm loss
    learning_rate: dict[int, float] = field(default_factory=dict)  # iteration -> LR Megatron logged there
    # iteration -> its wall time (mean over the log interval), and when Megatron logged it ("%Y-%m-%d %H:%M:%S.%f")
    iteration_ms: dict[int, float] = field(default_factory=dict)
    iteration_time: dict[int, str] = field(default_factory=dict)
    valid_loss: dict[str, dict[int, float]] = field(default_factory=dict)  # domain -> iteration -> loss
    final_valid_loss: dict[str, float] = field(default_factory=dict)  # domain -> loss of the end-of-run pass
    # logging.train_loss_by: level (group, source) -> domain -> iteration -> loss over the log interval,
    # and the tokens it is the mean of
    domain_train_loss: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    domain_train_tokens: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    tokens_per_second: dict[int, float] = field(default_factory=dict)  # iteration -> tokens/s/GPU
    stragglers: dict[int, Straggler] = field(default_factory=dict)  # iteration -> the interval's slowest rank
    saves_started: list[int] = field(default_factory=list)  # checkpoint iterations, in log order
    saves_completed: list[int] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)  # iteration of each checkpoint a launch resumed from
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
    for m in _ITERATION_TIME.finditer(text):
        log.iteration_time[int(m.group(2))] = m.group(1)
    for m in _DOMAIN_TRAIN.finditer(text):
        iteration, level = int(m.group(1)), m.group(2)
        for cell in _DOMAIN_CELL.finditer(m.group(3)):
            log.domain_train_loss.setdefault(level, {}).setdefault(cell.group(1), {})[iteration] = float(cell.group(2))
            log.domain_train_tokens.setdefault(level, {}).setdefault(cell.group(1), {})[iteration] = int(cell.group(3))
    for m in _TOKENS_PER_SECOND.finditer(text):
        log.tokens_per_second[int(m.group(1))] = float(m.group(2))
    for m in _STRAGGLER.finditer(text):
        log.stragglers[int(m.group(1))] = Straggler(int(m.group(2)), m.group(3), float(m.group(4)), float(m.group(5)))
    for m in _VALID.finditer(text):
        domain, iteration, loss = m.group(1), int(m.group(2)), float(m.group(4))
        if m.group(3):  # the end-of-run pass; a periodic pass at the same iteration is kept
            log.final_valid_loss[domain] = loss
            log.valid_loss.setdefault(domain, {}).setdefault(iteration, loss)
        else:
            log.valid_loss.setdefault(domain, {})[iteration] = loss
    log.saves_started = [int(i) for i in _SAVING.findall(text)]
    log.saves_completed = [int(i) for i in _SAVED.findall(text)]
    log.loads = [int(i) for i in _LOADED.findall(text)]
    return log


def iterations_logged(text: str) -> list[int]:
    """Every training iteration Megatron logged, in log order (a resumed run repeats some)."""
    return [int(m.group(1)) for m in _TRAIN.finditer(text)]


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
