"""Every replacement of a ``megatron.training`` attribute the engine makes, in one place.

Megatron's loop (``pretrain`` -> ``train`` -> ``train_step`` ...) has no callback interface for what
we add, so we wrap a few of its module-level functions; the loop looks each up in its module's
globals at call time, so a wrapper installed before ``pretrain`` is the one it calls. ``HOOKS``
lists each with the parameters of the Megatron function we rely on (positional order as Megatron
calls it); tests/test_megatron_hooks.py fails when one is gone or its parameters changed in the
installed Megatron, and when any module outside the seams assigns an attribute of a ``megatron``
module. The other two seams patch Megatron for other reasons, each with its own pinned list:
runtime/cpu.py (CUDA-only calls, on a machine without a GPU) and runtime/wheel_fixes.py (defects of
the 0.19.2 wheel).

``install`` wraps, in this order (a later wrapper does not wrap an earlier one: they are different
functions, so the order only fixes what runs first where two hooks fire at the same point):

  train                 set-up is over: heartbeat and timeline; validation at iteration 0
                        (train.eval_at_start), through Megatron's own evaluate_and_print_results
  train_step            heartbeat "step k, compute"; the straggler clock starts
  finalize_model_grads  the straggler clock stops; heartbeat "step k, reduce" (the rank reached the
                        gradient reduction: a hang past this point is in the collective)
  evaluate              heartbeat and timeline "eval" around each validation pass
  save_checkpoint       heartbeat and timeline "save" around each save; checkpoint retention after it
  training_log          every iteration: timeline "step"; each interval metric's end of iteration;
                        at log intervals their reports, in order (tokens/s, loss per domain,
                        stragglers), through the one metrics sink
"""

from __future__ import annotations

import functools
import importlib
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ellama_megatron.engine.metrics import IntervalMetric, MetricsSink, Report
from ellama_megatron.formats.heartbeat import HeartbeatWriter
from ellama_megatron.formats.timeline import TimelineWriter

TRAINING = "megatron.training.training"


@dataclass(frozen=True)
class Hook:
    module: str
    attribute: str
    parameters: tuple[str, ...]  # the leading parameters we read or pass on, in Megatron's order
    why: str


HOOKS: tuple[Hook, ...] = (
    Hook(
        TRAINING,
        "train",
        (
            "forward_step_func",
            "model",
            "optimizer",
            "opt_param_scheduler",
            "train_data_iterator",
            "valid_data_iterator",
            "process_non_loss_data_func",
            "config",
            "checkpointing_context",
            "non_loss_data_func",
        ),
        "set-up ends; validation at iteration 0",
    ),
    Hook(
        TRAINING,
        "train_step",
        (
            "forward_step_func",
            "data_iterator",
            "model",
            "optimizer",
            "opt_param_scheduler",
            "config",
            "forward_backward_func",
            "iteration",
        ),
        "a step begins: heartbeat, straggler clock",
    ),
    Hook(
        TRAINING,
        "finalize_model_grads",
        ("model", "num_tokens"),
        "compute ends, the gradient reduction begins: straggler clock, heartbeat",
    ),
    Hook(
        TRAINING,
        "evaluate",
        ("forward_step_func", "data_iterator", "model", "process_non_loss_data_func", "config"),
        "a validation pass: heartbeat, timeline",
    ),
    Hook(
        TRAINING,
        "save_checkpoint",
        ("iteration", "model", "optimizer", "opt_param_scheduler", "num_floating_point_operations_so_far"),
        "a save: heartbeat, timeline, checkpoint retention",
    ),
    Hook(
        TRAINING,
        "training_log",
        (
            "loss_dict",
            "total_loss_dict",
            "learning_rate",
            "iteration",
            "loss_scale",
            "report_memory_flag",
            "skipped_iter",
        ),
        "each iteration's end; metrics at log intervals",
    ),
)


@dataclass
class LoopHooks:
    """What the hooks do; every part optional. Built by engine/train.py from the run's config."""

    eval_at_start: bool = False
    heartbeat: HeartbeatWriter | None = None
    timeline: TimelineWriter | None = None  # global rank 0 only
    metrics: list[IntervalMetric] = field(default_factory=list)  # in report order
    straggler_clock: object | None = None  # engine/stragglers.StragglerClock; also in ``metrics``
    after_save: Callable[[], None] | None = None  # checkpoint retention
    sink: MetricsSink = field(default_factory=MetricsSink)
    _step_s: deque = field(default_factory=lambda: deque(maxlen=50))  # recent step durations
    _step_began: float | None = None
    _iteration: int = 0  # the step in progress, or the last one completed

    def beat(self, phase: str, stage: str | None = None) -> None:
        if self.heartbeat is not None:
            median = statistics.median(self._step_s) if self._step_s else None
            self.heartbeat.beat(phase, self._iteration, stage, median)

    def mark(self, event: str) -> None:
        if self.timeline is not None:
            self.timeline.write(event, self._iteration)


def _wrap(hook: Hook, make: Callable[[Callable], Callable]) -> None:
    module = importlib.import_module(hook.module)
    original = getattr(module, hook.attribute)
    setattr(module, hook.attribute, functools.wraps(original)(make(original)))


def install(hooks: LoopHooks) -> None:
    """Wrap Megatron's loop functions (HOOKS, in order). Call once per process, before ``pretrain``."""
    import time

    from megatron.training import training

    by_name = {h.attribute: h for h in HOOKS}

    def train(original):
        def wrapper(*args, **kwargs):
            # Megatron's loop calls train with its ten leading arguments by position (HOOKS pins them).
            a = dict(zip(by_name["train"].parameters, args))
            megatron_args = training.get_args()
            hooks._iteration = megatron_args.iteration
            hooks.mark("train_start")
            hooks.beat("step", "compute")
            if (
                hooks.eval_at_start
                and megatron_args.iteration == 0  # a resumed run validated its start when it first started
                and megatron_args.do_valid
                and a["valid_data_iterator"] is not None
            ):
                # Megatron validates only after a step whose number is a multiple of eval_interval:
                # the base model's loss, the point a continued-pretraining curve is measured from,
                # would never show. Its own pass, same iterators, same log line and TensorBoard step 0.
                training.evaluate_and_print_results(
                    "iteration 0",
                    a["forward_step_func"],
                    a["valid_data_iterator"],
                    a["model"],
                    0,
                    a["process_non_loss_data_func"],
                    a["config"],
                    verbose=False,
                    write_to_tensorboard=True,
                    non_loss_data_func=a["non_loss_data_func"],
                    pg_collection=kwargs.get("pg_collection"),
                    p2p_communicator=kwargs.get("p2p_communicator"),
                )
            return original(*args, **kwargs)

        return wrapper

    def train_step(original):
        def wrapper(*args, **kwargs):
            hooks._iteration = training.get_args().curr_iteration + 1  # the loop keeps its count there
            hooks._step_began = time.monotonic()
            hooks.beat("step", "compute")
            if hooks.straggler_clock is not None:
                hooks.straggler_clock.step_started()
            return original(*args, **kwargs)

        return wrapper

    def finalize_model_grads(original):
        def wrapper(*args, **kwargs):
            if hooks.straggler_clock is not None:
                hooks.straggler_clock.compute_ended()
            hooks.beat("step", "reduce")
            return original(*args, **kwargs)

        return wrapper

    def evaluate(original):
        def wrapper(*args, **kwargs):
            hooks.beat("eval")
            hooks.mark("eval_start")
            result = original(*args, **kwargs)
            hooks.mark("eval_end")
            hooks.beat("step", "compute")
            return result

        return wrapper

    def save_checkpoint(original):
        def wrapper(iteration, *args, **kwargs):
            hooks._iteration = iteration
            hooks.beat("save")
            hooks.mark("save_start")
            result = original(iteration, *args, **kwargs)
            if hooks.after_save is not None:
                hooks.after_save()
            hooks.mark("save_end")
            hooks.beat("step", "compute")
            return result

        return wrapper

    def training_log(original):
        def wrapper(
            loss_dict,
            total_loss_dict,
            learning_rate,
            iteration,
            loss_scale,
            report_memory_flag,
            skipped_iter,
            *args,
            is_first_iteration=False,
            **kwargs,
        ):
            result = original(
                loss_dict,
                total_loss_dict,
                learning_rate,
                iteration,
                loss_scale,
                report_memory_flag,
                skipped_iter,
                *args,
                is_first_iteration=is_first_iteration,
                **kwargs,
            )
            if hooks._step_began is not None:
                hooks._step_s.append(time.monotonic() - hooks._step_began)
                hooks._step_began = None
            hooks._iteration = iteration
            hooks.mark("step")
            for metric in hooks.metrics:
                metric.end_iteration(iteration, bool(skipped_iter))
            # Megatron prints a launch's first iteration too, whatever the interval.
            if iteration % training.get_args().log_interval == 0 or is_first_iteration:
                merged = Report()
                for metric in hooks.metrics:
                    report = metric.report(iteration, is_first_iteration)
                    if report is not None:
                        merged.scalars.update(report.scalars)
                        merged.lines.extend(report.lines)
                hooks.sink.write(iteration, merged)
            return result

        return wrapper

    makers = {
        "train": train,
        "train_step": train_step,
        "finalize_model_grads": finalize_model_grads,
        "evaluate": evaluate,
        "save_checkpoint": save_checkpoint,
        "training_log": training_log,
    }
    assert list(makers) == [h.attribute for h in HOOKS], "install() must follow HOOKS"
    for name, make in makers.items():
        _wrap(by_name[name], make)
