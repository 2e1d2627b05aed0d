"""Forward step and loss for Megatron's schedules: next-token cross-entropy summed over tokens,
reported as (sum, count) so Megatron averages over the tokens of the whole global batch."""

from __future__ import annotations

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


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"])
