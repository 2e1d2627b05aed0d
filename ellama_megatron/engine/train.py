"""One training rank: ``python -m ellama_megatron.engine.train --config RUN_DIR/config.yaml``.

torchrun (local) or srun (Slurm) starts one of these per GPU (per CPU process on a laptop). The
resolved config was checked and written by recipes/cpt.py; this only translates it into
Megatron's arguments and hands over to ``megatron.training.pretrain``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf

from ellama_megatron.run.progress import DONE_FILE, saved_iteration
from ellama_megatron.runtime.parent_death import die_with_parent

if __name__ == "__mp_main__":
    # A helper Megatron spawned from a rank (spawn re-imports the rank's main module under this
    # name): it dies with its rank, not leaked when the rank is killed.
    die_with_parent()


# Set in every rank before CUDA starts, unless the launch set it. Megatron asserts it whenever TP or CP
# > 1 on Hopper and older GPUs (one CUDA work queue keeps TP communication in order with compute):
# slurm/launch.sh exported it, a torchrun launch on a GPU node had only the user's shell.
RANK_ENVIRONMENT = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}

CHECKPOINT_HELPER_NAME = "ckpt-helper"  # the forked write-results helper's process name (ps, top)


def slurm_env_to_torch() -> None:
    """Under srun each task is a rank: expose Slurm's ids under the names torch.distributed reads."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def start_checkpoint_helper_ignoring_sigterm() -> None:
    """Start Megatron's checkpoint-writer helper now, deaf to SIGTERM, forked when it can be.

    Slurm delivers a signal to every process of a job step, not only to the ranks. A rank answers
    SIGTERM by saving a checkpoint and exiting (Megatron's exit-signal handler), but the save
    reports through a helper process (megatron.core's write-results queue, a multiprocessing
    Manager, otherwise created at the first save) that the same SIGTERM kills first: the save then
    fails and the run falls back to its previous checkpoint. A helper started while SIGTERM is
    ignored keeps ignoring it (fork and exec keep ignored signals); Megatron installs the rank's own
    handler afterwards. (With checkpoint.async_save on GPU, Megatron's persistent async writer is
    another such process.)

    Megatron spawns the helper: a fresh interpreter, which imports torch and Megatron's checkpoint
    classes when the first save's results reach it, so every launch's first save waited for that
    import (3 s of a 21 s tiny run on 2 CPU cores, and 8 s of its CPU time; on a GPU node, eight
    helpers importing torch at once). Forked from the rank, it has them already. A fork is safe here,
    at the start of main: no other thread runs and CUDA has not started; otherwise (a caller's
    threads) it is spawned as before, and re-imports this module, hence its light top-level imports.
    Either way it dies with its rank (runtime/parent_death.py).
    """
    import signal
    import threading

    import torch
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    from ellama_megatron.runtime.parent_death import forked_children_die_with_parent

    fork = threading.active_count() == 1 and not torch.cuda.is_initialized()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with forked_children_die_with_parent(CHECKPOINT_HELPER_NAME):
            get_write_results_queue("fork" if fork else "spawn")  # created once per process; saves reuse it
    finally:
        signal.signal(signal.SIGTERM, previous)


def loss_checks(cfg):
    from ellama_megatron.engine.forward_step import LOSS_REFERENCE_FILE, LossChecks

    r = cfg.resilience
    return LossChecks(
        nan=bool(r.check_nan),
        spike_factor=r.spike_factor,
        spike_window=int(r.spike_window),
        reference_file=str(Path(cfg.run_dir) / LOSS_REFERENCE_FILE),
        inject_at=r.inject_loss_at,
        inject_kind=r.inject_loss_kind,
        crash_at=r.get("inject_crash_at"),
    )


def loop_hooks(cfg, domain_loss, megatron_args):
    """What engine/megatron_hooks.py does in this run: heartbeats where the launcher asked for them,
    rank 0's timeline, the interval metrics, checkpoint retention, validation at iteration 0."""
    import socket

    import psutil
    import torch

    from ellama_megatron.engine.megatron_args import checkpoint_dir, on_cpu
    from ellama_megatron.engine.megatron_hooks import LoopHooks
    from ellama_megatron.engine.metrics import TokensPerSecond
    from ellama_megatron.engine.stragglers import StragglerClock
    from ellama_megatron.formats.heartbeat import HEARTBEAT_DIR_ENV, HeartbeatWriter
    from ellama_megatron.formats.timeline import TimelineWriter, default_launch_id
    from ellama_megatron.run.recovery import prune_after_save

    rank = int(os.environ.get("RANK", "0"))
    folder = os.environ.get(HEARTBEAT_DIR_ENV)
    heartbeat = (
        HeartbeatWriter(folder, rank, int(os.environ.get("LOCAL_RANK", "0")), socket.gethostname()) if folder else None
    )
    hooks = LoopHooks(
        eval_at_start=bool(cfg.train.get("eval_at_start")),  # .get: a run folder written before the key existed
        heartbeat=heartbeat,
        timeline=TimelineWriter(cfg.run_dir, default_launch_id()) if rank == 0 else None,
    )
    if hooks.timeline is not None:
        hooks.timeline.write("start", 0, t=psutil.Process().create_time())
    hooks.beat("setup")
    if cfg.logging.log_throughput:
        hooks.metrics.append(
            TokensPerSecond(megatron_args.global_batch_size, megatron_args.seq_length, megatron_args.world_size)
        )
    if domain_loss is not None:
        hooks.metrics.append(domain_loss)
    logging_cfg = cfg.logging
    if logging_cfg.get("straggler_factor") is not None:
        on_gpu = not on_cpu(cfg) and torch.cuda.is_available()
        clock = StragglerClock(
            float(logging_cfg.straggler_factor), int(logging_cfg.straggler_intervals), cfg.run_dir, on_gpu
        )
        hooks.straggler_clock = clock
        hooks.metrics.append(clock)
    if cfg.checkpoint.keep_last is not None and rank == 0:
        save_dir = checkpoint_dir(cfg)
        hooks.after_save = partial(prune_after_save, save_dir, cfg.checkpoint, cfg.resilience)
    return hooks


def run(cfg) -> None:
    from ellama_megatron.engine.datasets import datasets_provider, resolve_blend
    from ellama_megatron.engine.domain_loss import DomainLoss
    from ellama_megatron.engine.forward_step import SPIKE_REFERENCE, forward_step
    from ellama_megatron.engine.megatron_args import megatron_argv, on_cpu
    from ellama_megatron.engine.megatron_hooks import install as install_loop_hooks
    from ellama_megatron.engine.token_ids import TokenIdCheck
    from ellama_megatron.formats.atomic import write_json_atomic
    from ellama_megatron.llama.config import LlamaConfig
    from ellama_megatron.llama.megatron import megatron_model_provider, resolve_impl
    from ellama_megatron.run.plan import RunPlan
    from ellama_megatron.runtime.cpu import apply_cpu_runtime
    from ellama_megatron.runtime.wheel_fixes import apply_wheel_fixes

    model = LlamaConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), "config.model")
    transformer_impl, attention = resolve_impl(cfg.impl.transformer, cfg.impl.attention)
    if on_cpu(cfg):
        apply_cpu_runtime()
    apply_wheel_fixes()

    blend = resolve_blend(cfg.data, cfg.train.train_tokens, cfg.train.seq_length)
    argv = megatron_argv(cfg, model, transformer_impl)
    argv += ["--validation-set-names", *blend["valid"].keys()]
    sys.argv = [sys.argv[0], *argv]

    from megatron.core.enums import ModelType
    from megatron.training import training
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    checks = loss_checks(cfg)
    SPIKE_REFERENCE.load(checks.reference_file)  # before any rank trains and rewrites it
    domain_loss = DomainLoss.from_blend(blend["train"], cfg.logging.train_loss_by)
    args = parse_and_validate_args()
    hooks = loop_hooks(cfg, domain_loss, args)
    install_loop_hooks(hooks)
    container = pretrain_cfg_container_from_args(args)
    cache = Path(cfg.run_dir) / "dataset_cache"
    # .get: a run folder written before the key existed checks its ids too
    token_ids = TokenIdCheck(model.vocab_size) if cfg.resilience.get("check_token_ids", True) else None
    # The imports (torch, Megatron, transformers) leave millions of long-lived objects that every full
    # collection walks again, and Megatron's optimizer-state sharding calls gc.collect() at each save:
    # frozen, they are left out of every collection (nothing imported is ever garbage). A tiny CPU
    # run's saves after the first took 0.5 s each, 0.17 s frozen; the losses are the same.
    gc.freeze()
    training.pretrain(
        container,
        datasets_provider(blend, model.eos_token_id, model.vocab_size, cache, traced=token_ids is not None),
        ModelType.encoder_or_decoder,
        partial(forward_step, checks=checks, domain_loss=domain_loss, token_ids=token_ids),
        model_provider=megatron_model_provider(model, attention),
    )
    # pretrain returns only when the budget is spent (early exits call sys.exit after saving).
    import torch.distributed as dist

    hooks.mark("done")
    hooks.beat("done")
    if dist.get_rank() == 0:
        done = {"iteration": saved_iteration(cfg.run_dir), "train_iters": RunPlan.from_cfg(cfg).train_iterations}
        write_json_atomic(Path(cfg.run_dir) / DONE_FILE, done)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="One Megatron training rank of an ellama-megatron run. Started by torchrun "
        "(recipes/cpt.py) or srun (slurm/launch.sh); not meant to be run by hand."
    )
    parser.add_argument("--config", required=True, help="resolved config written by recipes/cpt.py")
    opts = parser.parse_args(argv)
    die_with_parent()  # a rank outliving torchrun/srun would train beside the relaunch
    slurm_env_to_torch()
    for name, value in RANK_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    cfg = OmegaConf.load(opts.config)
    from ellama_megatron.engine import failure_evidence
    from ellama_megatron.formats.timeline import default_launch_id

    for name, value in failure_evidence.flight_recorder_environment(cfg.run_dir).items():
        os.environ.setdefault(name, value)  # before torch.distributed starts
    Path(os.environ["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    from ellama_megatron.runtime.frozen_imports import import_frozen

    # Once the environment is set: a second or two sooner with the collector off (runtime/frozen_imports.py).
    import_frozen("torch", "megatron.training.training")
    start_checkpoint_helper_ignoring_sigterm()  # first: forked before any thread starts
    failure_evidence.arm(rank)
    from ellama_megatron.run.faults import BAD_DATA, EXIT_BAD_DATA, BadData

    try:
        run(cfg)
    except SystemExit as exc:
        record_rerun_exit(cfg, exc.code)
        raise
    except BadData as exc:
        # The data's fault, said in one line (engine/token_ids.py): recorded for the launcher, which
        # stops the run with it; a traceback would only bury it.
        failure_evidence.record_exception(cfg.run_dir, default_launch_id(), rank, exc, _current_iteration())
        print(f"error: {BAD_DATA}: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_DATA)
    except BaseException as exc:
        failure_evidence.record_exception(cfg.run_dir, default_launch_id(), rank, exc, _current_iteration())
        raise


def _current_iteration() -> int | None:
    try:
        from megatron.training import get_args

        return get_args().iteration
    except Exception:
        return None


def record_rerun_exit(cfg, code) -> None:
    """Rank 0 notes Megatron's exit 16/17 in the run folder: torchrun reports any failed rank as 1,
    so the launcher would not know otherwise."""
    from ellama_megatron.formats.atomic import write_json_atomic
    from ellama_megatron.run.events import EXIT_RERUN_ELSEWHERE, EXIT_RESULT_REJECTED, RANK_EXIT_FILE

    if code in (EXIT_RERUN_ELSEWHERE, EXIT_RESULT_REJECTED) and os.environ.get("RANK", "0") == "0":
        write_json_atomic(Path(cfg.run_dir) / RANK_EXIT_FILE, {"exit_code": code, "pid": os.getpid()})


if __name__ == "__main__":  # the async checkpoint writer spawns processes that re-import this module: keep the guard
    main()
