"""The one place where our Hydra config becomes Megatron-LM command-line arguments.

Everything Megatron's loop does (schedules, checkpoint format, logging) is driven by its own
arguments; we only translate. Derived numbers (iterations from a token budget, DP, layers per
virtual stage, the vocab padding) come from the run's RunPlan.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ellama_megatron.engine.lr_schedule import warmup_iterations, wsd_decay_iterations
from ellama_megatron.llama.config import LlamaConfig
from ellama_megatron.llama.megatron import CPU_MODEL_ARGS, model_args
from ellama_megatron.run.events import RESULT_REJECTED_FILE
from ellama_megatron.run.plan import VOCAB_DIVISIBLE_BY, RunPlan
from ellama_megatron.run.progress import save_folder
from ellama_megatron.run.recovery import skipped_iterations


def checkpoint_dir(cfg) -> Path:
    return save_folder(cfg.run_dir)


def on_cpu(cfg) -> bool:
    return cfg.cluster.accelerator == "cpu"


def _flag(name: str, value: Any) -> list[str]:
    """``--name value``, a bare ``--name`` for True, nothing for False/None."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    return [f"--{name}", str(value)]


def tokenizer_args(m: LlamaConfig) -> list[str]:
    return [
        # The datasets already hold token ids: Megatron only needs the vocab size and the EOD id.
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        m.vocab_size,
        "--null-tokenizer-eod-id",
        m.eos_token_id,
        "--make-vocab-size-divisible-by",
        VOCAB_DIVISIBLE_BY,
    ]


def parallel_args(cfg, plan: RunPlan, transformer_impl: str) -> list[str]:
    p = cfg.parallel
    args = [
        "--tensor-model-parallel-size",
        p.tensor_model_parallel_size,
        "--pipeline-model-parallel-size",
        p.pipeline_model_parallel_size,
        "--context-parallel-size",
        p.context_parallel_size,
    ]
    args += _flag("num-layers-per-virtual-pipeline-stage", plan.layers_per_virtual_stage)
    # Megatron's local spec norms (torch RMSNorm, no apex) cannot shard over the sequence: only TE can.
    sp = bool(p.sequence_parallel) and p.tensor_model_parallel_size > 1 and transformer_impl == "transformer_engine"
    args += _flag("sequence-parallel", sp)
    args += _flag("use-distributed-optimizer", bool(p.use_distributed_optimizer))
    if p.recompute_granularity:
        args += ["--recompute-granularity", p.recompute_granularity]
        if p.recompute_granularity == "full":
            args += ["--recompute-method", "uniform", "--recompute-num-layers", p.recompute_num_layers or 1]
    if not on_cpu(cfg) and p.use_distributed_optimizer:
        args += ["--overlap-grad-reduce", "--overlap-param-gather"]
    return args


def lr_args(cfg, plan: RunPlan) -> list[str]:
    """The LR schedule (conf/optim); engine/lr_schedule.py prints the curve Megatron makes of these."""
    o = cfg.optim
    iters = plan.train_iterations
    args = [
        "--lr",
        o.lr,
        "--min-lr",
        o.min_lr,
        "--lr-decay-style",
        o.lr_decay_style,
        "--lr-decay-iters",
        iters,
        "--lr-warmup-iters",
        warmup_iterations(o, iters),
        # Warmup starts here: 0 from scratch; the base model's final LR to re-warm (Ibrahim et al. 2024).
        "--lr-warmup-init",
        o.lr_warmup_init,
    ]
    decay = wsd_decay_iterations(o, iters)
    if decay is not None:
        args += ["--lr-wsd-decay-style", o.lr_wsd_decay_style, "--lr-wsd-decay-iters", decay]
    return args


def train_args(cfg, plan: RunPlan) -> list[str]:
    t, o = cfg.train, cfg.optim
    iters = plan.train_iterations
    args = [
        "--seq-length",
        t.seq_length,
        "--micro-batch-size",
        t.micro_batch_size,
        "--global-batch-size",
        t.global_batch_size,
        "--train-iters",
        iters,
        "--seed",
        t.seed,
        *lr_args(cfg, plan),
        "--adam-beta1",
        o.adam_beta1,
        "--adam-beta2",
        o.adam_beta2,
        "--adam-eps",
        o.adam_eps,
        "--weight-decay",
        o.weight_decay,
        "--clip-grad",
        o.clip_grad,
        # Per-domain validation: one full pass over each domain's held-out set, logged by name.
        "--eval-interval",
        t.eval_interval,
        "--eval-iters",
        t.eval_iters,
        "--full-validation",
        "--multiple-validation-sets",
        # Full validation feeds one sample per DP rank per batch (MegatronFullValidationSampler):
        # size the evaluation step to that, so each domain is passed over exactly once (and PP
        # stages agree on the activation shape).
        "--eval-micro-batch-size",
        1,
        "--eval-global-batch-size",
        plan.dp,
        "--log-interval",
        t.log_interval,
    ]
    args += _flag("exit-interval", t.exit_interval)
    args += _flag("exit-duration-in-mins", t.exit_duration_in_mins)
    if plan.precision == "bf16":
        args += ["--bf16"]
    return args


def checkpoint_args(cfg, plan: RunPlan) -> list[str]:
    c = cfg.checkpoint
    ckpt = checkpoint_dir(cfg)
    args = [
        # Same folder for save and load: a relaunch resumes whatever the run saved last.
        "--save",
        ckpt,
        "--load",
        ckpt,
        "--save-interval",
        plan.save_interval,  # checkpoint.save_interval, with auto resolved (Young/Daly)
        "--ckpt-format",
        c.format,
        # Optimizer state stored per parameter, not per DP bucket: a run can resume at another TP/PP.
        "--dist-ckpt-optim-fully-reshardable",
        # SIGTERM (Slurm preemption, scancel) -> save a checkpoint and exit cleanly.
        "--exit-signal-handler",
    ]
    if c.init_from:
        # Used only while ${run_dir}/checkpoints is empty: weights only, iteration 0.
        args += ["--pretrained-checkpoint", c.init_from]
    args += _flag("no-save-optim", not c.save_optim)
    if c.async_save:
        # Megatron 0.19 drops --async-save (a warning, then synchronous saves) without the persistent
        # worker; async_save on CPU is refused by run/checks.py before we get here.
        args += ["--async-save", "--use-persistent-ckpt-worker"]
    return args


def resilience_args(cfg) -> list[str]:
    """Megatron's rerun state machine, as conf/resilience sets it; the loss checks themselves are
    the loss function's (engine/forward_step.py, LossChecks)."""
    r = cfg.resilience
    args = [
        "--rerun-mode",
        r.rerun_mode,
        # Megatron reads it back on each launch: an iteration rejected twice is skipped (--iterations-to-skip).
        "--result-rejected-tracker-filename",
        Path(cfg.run_dir) / RESULT_REJECTED_FILE,
    ]
    args += _flag("no-check-for-nan-in-loss-and-grad", not r.check_nan)
    args += _flag("check-for-spiky-loss", r.spike_factor is not None)
    # The user's, and those the run's skip/rollback relaunches passed over (events.jsonl).
    skipped = sorted(set(r.iterations_to_skip) | set(skipped_iterations(cfg.run_dir)))
    if skipped:
        args += ["--iterations-to-skip", *skipped]
    if r.error_injection_rate:
        args += ["--error-injection-rate", r.error_injection_rate, "--error-injection-type", r.error_injection_type]
    if r.get("hang_detection"):  # .get: a run folder written before the key existed
        args += ["--distributed-timeout-minutes", collective_timeout_minutes(r)]
    return args


def collective_timeout_minutes(resilience) -> int:
    """Megatron's collective timeout, above the watchdog's longest phase timeout: the watchdog must
    find a hang (and name the rank) before a collective times out on the ranks waiting for it."""
    from ellama_megatron.run.faults import Timeouts

    return math.ceil(Timeouts.from_config(resilience).longest_s / 60) + 5


def logging_args(cfg) -> list[str]:
    lg = cfg.logging
    args = ["--log-validation-ppl-to-tensorboard", "--log-timers-to-tensorboard"]
    if lg.tensorboard:
        args += ["--tensorboard-dir", Path(cfg.run_dir) / "tensorboard"]
    if lg.log_throughput:
        args += ["--log-throughput"]
    if lg.log_memory and not on_cpu(cfg):
        args += ["--log-memory-to-tensorboard"]
    if lg.get("megatron_straggler") and not on_cpu(cfg):  # CUDA timers: nothing to measure on a CPU
        args += ["--log-straggler", "--straggler-minmax-count", lg.megatron_straggler]
    if lg.wandb_project:
        args += [
            "--wandb-project",
            lg.wandb_project,
            "--wandb-exp-name",
            cfg.run_name,
            "--wandb-save-dir",
            Path(cfg.run_dir) / "wandb",
        ]
        args += _flag("wandb-entity", lg.wandb_entity)
    return args


def runtime_args(cfg, transformer_impl: str) -> list[str]:
    args = ["--transformer-impl", transformer_impl]
    if on_cpu(cfg):
        args += [
            "--distributed-backend",
            "gloo",
            *CPU_MODEL_ARGS,
            # The CPU has no CUDA RNG: no CUDA RNG state to restore on resume.
            "--no-load-rng",
            "--num-workers",
            0,
        ]
    else:
        args += ["--distributed-backend", "nccl", "--num-workers", 2]
    return args


def megatron_argv(cfg, model: LlamaConfig, transformer_impl: str) -> list[str]:
    """The complete Megatron argument list for one resolved config."""
    plan = RunPlan.from_cfg(cfg)
    argv = (
        model_args(model)
        + tokenizer_args(model)
        + parallel_args(cfg, plan, transformer_impl)
        + train_args(cfg, plan)
        + checkpoint_args(cfg, plan)
        + resilience_args(cfg)
        + logging_args(cfg)
        + runtime_args(cfg, transformer_impl)
    )
    return [str(a) for a in argv]
