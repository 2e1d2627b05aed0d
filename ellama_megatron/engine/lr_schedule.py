"""The learning-rate schedule of a run: its iteration counts, derived here once from conf/optim (the
Megatron argv reads them from here), and the curve Megatron's own OptimizerParamScheduler follows
for that argv, which the planner (tools/plan.py) and the dry run (ELLAMA_DRY_RUN=1) print.

The curve is not a re-implementation: the run's LR flags (engine/megatron_args.py ``lr_args``) go
through Megatron's argument parser and into its scheduler, built as
``megatron.training.training.get_optimizer_param_scheduler`` builds it for an iteration-based run
(steps counted in samples). The LR given for iteration i is the one Megatron logs there: after i
optimizer steps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60  # characters of the sparkline


def warmup_iterations(optim, iterations: int) -> int:
    """Linear warmup from optim.lr_warmup_init to optim.lr over this many iterations."""
    return int(round(float(optim.lr_warmup_fraction) * iterations))


def wsd_decay_iterations(optim, iterations: int) -> int | None:
    """WSD's final decay phase (Megatron's --lr-wsd-decay-iters); None for the other styles."""
    if optim.lr_decay_style != "WSD":
        return None
    return max(1, int(round(float(optim.lr_wsd_decay_fraction) * iterations)))


class _ParamGroups:
    """All the scheduler touches of an optimizer: it sets lr and weight decay on each param group."""

    param_groups = [{}]


def megatron_scheduler(cfg):
    """Megatron's OptimizerParamScheduler for the run's LR flags, parsed by Megatron's parser."""
    from ellama_megatron.engine.megatron_args import lr_args
    from ellama_megatron.run.plan import RunPlan

    plan = RunPlan.from_cfg(cfg)
    argv = [str(a) for a in lr_args(cfg, plan)]
    argv += [
        "--train-iters",
        str(plan.train_iterations),
        "--global-batch-size",
        str(plan.global_batch_size),
        "--weight-decay",
        str(cfg.optim.weight_decay),
    ]
    saved = sys.argv
    loggers = {name: logging.getLogger(name) for name in ("megatron", "torch.utils.cpp_extension")}
    levels = {name: log.level for name, log in loggers.items()}
    sys.argv = [saved[0] if saved else "ellama_megatron", *argv]
    # Quiet: Megatron's import-time notes (Apex, TE, FSDP, no CUDA) and its scheduler's INFO line,
    # which a Hydra recipe's logging would print.
    for log in loggers.values():
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            from ellama_megatron.runtime.frozen_imports import import_frozen

            # In the launcher, the first import of Megatron: seconds sooner with the collector off.
            import_frozen("megatron.core.optimizer_param_scheduler", "megatron.training.arguments")
            from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
            from megatron.training.arguments import parse_args

            args = parse_args()
            return _scheduler(OptimizerParamScheduler, args), args
    finally:
        sys.argv = saved
        for name, log in loggers.items():
            log.setLevel(levels[name])


def _scheduler(OptimizerParamScheduler, args):
    """As get_optimizer_param_scheduler builds it for --train-iters (its steps count samples)."""
    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        _ParamGroups(),
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,  # constant weight decay: what validate_args makes of --weight-decay alone
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def lr_curve(cfg, iterations: list[int] | None = None) -> dict[int, float]:
    """{iteration: LR} at the given iterations (default: every one) of the run ``cfg`` describes."""
    scheduler, args = megatron_scheduler(cfg)
    if iterations is None:
        iterations = list(range(args.train_iters + 1))
    out = {}
    for it in iterations:
        scheduler.num_steps = it * args.global_batch_size
        out[it] = scheduler.get_lr({})
    return out


def key_iterations(cfg) -> dict[int, str]:
    """The iterations where the schedule changes shape, with what happens there."""
    from ellama_megatron.run.plan import RunPlan

    total = RunPlan.from_cfg(cfg).train_iterations
    o = cfg.optim
    keys = {0: "start", total: "end"}
    warmup = warmup_iterations(o, total)
    if warmup:
        keys[warmup] = "peak (end of warmup)"
    decay = wsd_decay_iterations(o, total)
    if decay is not None:
        keys[total - decay] = f"WSD: {o.lr_wsd_decay_style} decay starts"
    for q in (0.25, 0.5, 0.75):
        keys.setdefault(int(round(q * total)), f"{q:.0%} of the run")
    return dict(sorted(keys.items()))


def format_lr_curve(cfg) -> str:
    """A sparkline of the whole schedule and the LR at its key iterations."""
    from ellama_megatron.run.plan import RunPlan

    total = RunPlan.from_cfg(cfg).train_iterations
    keys = key_iterations(cfg)
    samples = sorted({round(i * total / (SPARK_WIDTH - 1)) for i in range(SPARK_WIDTH)} | set(keys))
    curve = lr_curve(cfg, samples)
    top = max(curve.values()) or 1.0
    spark = "".join(
        SPARK[min(len(SPARK) - 1, int(curve[round(i * total / (SPARK_WIDTH - 1))] / top * len(SPARK)))]
        for i in range(SPARK_WIDTH)
    )
    o = cfg.optim
    lines = [f"learning rate ({o.lr_decay_style}, Megatron's scheduler) over {total:,} iterations: {spark}"]
    lines += [f"  iteration {it:>9,}  lr {curve[it]:.3e}  {what}" for it, what in keys.items()]
    return "\n".join(lines)
