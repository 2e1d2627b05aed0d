"""Forward step and loss for Megatron's schedules: next-token cross-entropy summed over tokens,
reported as (sum, count) so Megatron averages over the tokens of the whole global batch.

Each micro-batch's loss goes through Megatron's rerun state machine, as its own GPT loss function
does: a NaN or Inf loss, or (with resilience.spike_factor) a loss above that many times the largest
of the recent ones, is re-run in place to tell a transient fault from a reproducible result; the
state machine then saves the model from before the step and exits 16 (rerun elsewhere) or stops
with 17, so no checkpoint of a model past a bad loss is written."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator):
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args

    args = get_args()
    first = mpu.is_pipeline_first_stage(ignore_virtual=True)
    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    if not (first or last):
        return {k: None for k in BATCH_KEYS}  # middle pipeline stages take activations, not data

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        raw = next(data_iterator)
        batch = {k: (raw[k].cuda(non_blocking=True) if raw.get(k) is not None else None) for k in BATCH_KEYS}
    micro_batch_size = _micro_batch_size_from_tp_rank_0(batch, args.micro_batch_size)
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=False,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())


def _micro_batch_size_from_tp_rank_0(batch: dict, default: int) -> int:
    """Full validation feeds micro-batches of 1 (MegatronFullValidationSampler), training feeds
    --micro-batch-size: TP peers must size their receive buffers for the batch actually sent."""
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() == 1:
        return default
    size = torch.tensor([batch["tokens"].shape[0] if batch else 0], dtype=torch.long, device="cuda")
    torch.distributed.broadcast(size, mpu.get_tensor_model_parallel_src_rank(),
                                group=mpu.get_tensor_model_parallel_group())
    return int(size.item())


@dataclass(frozen=True)
class LossChecks:
    """What the loss function validates (conf/resilience)."""

    nan: bool = True  # NaN and Inf in the loss (Megatron's --no-check-for-nan-in-loss-and-grad turns it off)
    spike_factor: float | None = None  # reject a loss >= factor x the largest of the first `spike_window`; None = off
    spike_window: int = 100  # micro-batch losses observed before spikes are judged (Megatron's default)


def validate_loss(loss: torch.Tensor, checks: LossChecks) -> None:
    """Megatron's pretrain_gpt checks on one micro-batch's loss, all fatal: a bad loss must stop the
    run before the optimizer steps, not be trained through."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    if checks.nan:
        machine.validate_result(result=loss, rejection_func=torch.isnan,
                                message="found NaN in local forward loss calculation", tolerance=0.0, fatal=True)
        machine.validate_result(result=loss, rejection_func=torch.isinf,
                                message="found Inf in local forward loss calculation", tolerance=0.0, fatal=True)
    if checks.spike_factor:
        machine.validate_result(
            result=loss,
            rejection_func=partial(machine.is_unexpectedly_large, threshold=checks.spike_factor, context="loss",
                                   num_samples=checks.spike_window),
            message="Spiky loss", tolerance=0.0, fatal=True)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, checks: LossChecks = LossChecks()):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    validate_loss(loss, checks)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, checks: LossChecks = LossChecks()):
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"], checks=checks)
