"""Forward step and loss for Megatron's schedules: next-token cross-entropy summed over tokens,
reported as (sum, count) so Megatron averages over the tokens of the whole global batch.

Each micro-batch's loss goes through Megatron's rerun state machine, as its own GPT loss function
does: a NaN or Inf loss, or (with resilience.spike_factor) a loss that many times the run's
reference (SpikeReference, from its first micro-batch on), is re-run in place to tell a transient
fault from a reproducible result; the state machine then saves the model from before the step and
exits 16 (rerun elsewhere) or stops with 17, so no checkpoint of a model past a bad loss is written.
What the run does next is resilience.spike_policy's (run/recovery.py)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from functools import partial

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator, with_dataset_id: bool = False, token_ids=None):
    """The micro-batch on this rank; ``token_ids`` (engine/token_ids.py: TokenIdCheck, None = off)
    checks its ids where the data enters, on the host before the copy to the GPU."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args

    args = get_args()
    first = mpu.is_pipeline_first_stage(ignore_virtual=True)
    last = mpu.is_pipeline_last_stage(ignore_virtual=True)
    if not (first or last):
        return {k: None for k in BATCH_KEYS}  # middle pipeline stages take activations, not data

    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch, dataset_id = {}, None
    if tp_rank == 0:
        raw = next(data_iterator)
        if token_ids is not None:
            token_ids(raw)
        batch = {k: (raw[k].cuda(non_blocking=True) if raw.get(k) is not None else None) for k in BATCH_KEYS}
        dataset_id = raw.get("dataset_id")  # absent when the blend has one dataset: then every sample is entry 0
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
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    if with_dataset_id and last:
        batch["dataset_id"] = _dataset_id_from_tp_rank_0(dataset_id, micro_batch_size)
    return batch


def _dataset_id_from_tp_rank_0(dataset_id, micro_batch_size: int) -> torch.Tensor:
    """Each sample's blend entry (engine/domain_loss.py), on every TP rank of the last stage: only
    TP rank 0 reads data, and Megatron's batch broadcast carries the sequence tensors only."""
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_rank() == 0:
        ids = (
            torch.as_tensor(dataset_id, dtype=torch.long)
            if dataset_id is not None
            else torch.zeros(micro_batch_size, dtype=torch.long)
        ).cuda(non_blocking=True)
    else:
        ids = torch.empty(micro_batch_size, dtype=torch.long, device="cuda")
    if mpu.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            ids, mpu.get_tensor_model_parallel_src_rank(), group=mpu.get_tensor_model_parallel_group()
        )
    return ids


def _micro_batch_size_from_tp_rank_0(batch: dict, default: int) -> int:
    """Full validation feeds micro-batches of 1 (MegatronFullValidationSampler), training feeds
    --micro-batch-size: TP peers must size their receive buffers for the batch actually sent."""
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() == 1:
        return default
    size = torch.tensor([batch["tokens"].shape[0] if batch else 0], dtype=torch.long, device="cuda")
    torch.distributed.broadcast(
        size, mpu.get_tensor_model_parallel_src_rank(), group=mpu.get_tensor_model_parallel_group()
    )
    return int(size.item())


@dataclass(frozen=True)
class LossChecks:
    """What the loss function checks (conf/resilience)."""

    nan: bool = True  # NaN and Inf in the loss (Megatron's --no-check-for-nan-in-loss-and-grad turns it off)
    spike_factor: float | None = None  # reject a loss >= factor x the reference (SpikeReference); None = off
    spike_window: int = 100  # accepted micro-batch losses the reference is the largest of
    reference_file: str | None = (
        None  # where the spike reference outlives a launch (LOSS_REFERENCE_FILE); None = per launch
    )
    inject_at: int | None = None  # tests: this 1-based training iteration's loss is made bad, as bad data would
    inject_kind: str = "spike"  # nan, or spike (x INJECTED_SPIKE)
    crash_at: int | None = None  # tests: the last rank raises in this 1-based training iteration, every time

    def for_evaluation(self) -> LossChecks:
        """Validation losses are other data (other domains, other batch sizes): checked for NaN/Inf
        only, never judged against the training reference nor injected into."""
        return replace(self, spike_factor=None, inject_at=None, crash_at=None)


INJECTED_SPIKE = 1e4  # what resilience.inject_loss_kind=spike multiplies the loss by: far past any spike_factor
LOSS_REFERENCE_FILE = "loss_reference.json"  # in run_dir: SpikeReference's state, so that it outlives a launch


class SpikeReference:
    """The loss a spike is judged against: the largest of the run's first ``window`` accepted
    micro-batch losses, judged from the second one on.

    Megatron's ``is_unexpectedly_large`` judges only after its window (100) is full, and each
    launch starts it afresh: a CPT run that blows up at iteration 2 (lr=1e3: 6.2 -> 1e7) is trained
    through and checkpointed, and so is a relaunch whose model is already broken. A run that starts
    from a trained model knows its loss from the first micro-batch: that is the reference from then
    on, kept in the run folder (one loss rank writes it while it grows; every rank reads it at the
    start of a launch) so that a relaunch judges its first iteration against the run's losses, not its own.
    A rejected loss is not taken into it, so the rerun in place of a spike is rejected again (a
    reproducible result)."""

    def __init__(self) -> None:
        self.count = 0
        self.largest = 0.0

    def load(self, path: str) -> None:
        """The run's reference so far; read by every rank before any trains (one loss rank rewrites it)."""
        if os.path.exists(path):
            state = json.loads(open(path).read())
            self.count, self.largest = int(state["count"]), float(state["largest"])

    def observe(self, value: float, window: int, path: str | None) -> None:
        if self.count >= window or not math.isfinite(value):
            return
        self.count += 1
        self.largest = max(self.largest, abs(value))
        if path is not None and _first_of_the_loss_ranks():
            from ellama_megatron.formats.atomic import write_json_atomic

            write_json_atomic(path, {"count": self.count, "largest": self.largest})

    def is_spike(self, result: torch.Tensor, checks: LossChecks) -> bool:
        value = result.item()
        if not math.isfinite(value):
            return False  # the NaN/Inf checks' business
        spike = self.count > 0 and abs(value) >= self.largest * checks.spike_factor
        if not spike:
            self.observe(value, checks.spike_window, checks.reference_file)
        return spike


def _first_of_the_loss_ranks() -> bool:
    """One writer of the reference: the losses are computed on the last pipeline stage, by every
    data- and tensor-parallel rank of it (global rank 0 is on the first stage)."""
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_rank(with_context_parallel=True) == 0 and mpu.get_tensor_model_parallel_rank() == 0


SPIKE_REFERENCE = SpikeReference()  # one per rank: each judges its own micro-batches (any rejection reruns all)


def check_loss(loss: torch.Tensor, checks: LossChecks) -> None:
    """Megatron's pretrain_gpt checks on one micro-batch's loss, all fatal: a bad loss must stop the
    run before the optimizer steps, not be trained through."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    machine = get_rerun_state_machine()
    if not machine.first_iteration_complete and get_args().iteration > 0:
        # Megatron checks nothing in a launch's first iteration: a new run has no optimizer step to
        # save before it. A resumed one has (the checkpoint it loaded): its first iteration, after a
        # skip or rollback the very one that follows the skipped data, is checked like any other.
        machine.first_iteration_complete = True
    if checks.nan:
        machine.validate_result(
            result=loss,
            rejection_func=torch.isnan,
            message="found NaN in local forward loss calculation",
            tolerance=0.0,
            fatal=True,
        )
        machine.validate_result(
            result=loss,
            rejection_func=torch.isinf,
            message="found Inf in local forward loss calculation",
            tolerance=0.0,
            fatal=True,
        )
    if checks.spike_factor:
        if not machine.first_iteration_complete:
            # Not checked (nothing could be saved before the optimizer's first step), but observed:
            # a new run's first losses are the reference its second iteration is judged against.
            SPIKE_REFERENCE.observe(loss.item(), checks.spike_window, checks.reference_file)
        machine.validate_result(
            result=loss,
            rejection_func=partial(SPIKE_REFERENCE.is_spike, checks=checks),
            message="Spiky loss",
            tolerance=0.0,
            fatal=True,
        )


def injected(loss: torch.Tensor, checks: LossChecks) -> torch.Tensor:
    """The loss as resilience.inject_loss_at makes it (tests): bad on every run of that iteration,
    reruns in place included, as a bad batch of data would be."""
    from megatron.training import get_args

    if checks.inject_at is None or get_args().curr_iteration + 1 != checks.inject_at:
        return loss
    return loss * (float("nan") if checks.inject_kind == "nan" else INJECTED_SPIKE)


def crash_if_injected(checks: LossChecks) -> None:
    """resilience.inject_crash_at (tests): one rank fails at that iteration on every run of it, as a
    bug or a bad sample would; the others block in the next collective until the launcher ends them."""
    import torch.distributed as dist
    from megatron.training import get_args

    if checks.crash_at is not None and get_args().curr_iteration + 1 == checks.crash_at:
        if dist.get_rank() == dist.get_world_size() - 1:
            raise RuntimeError(f"injected crash at iteration {checks.crash_at} (resilience.inject_crash_at)")


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    checks: LossChecks = LossChecks(),
    domain_loss=None,
    dataset_id: torch.Tensor | None = None,
):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = injected(torch.sum(losses * mask), checks)
    # A copy: the state machine keeps the rejected result to compare the rerun with, and Megatron's
    # schedule then divides the loss in place (by tokens and micro-batches): kept by reference, a
    # reproduced spike would compare unequal and be diagnosed a transient fault (exit 17).
    check_loss(loss.detach().clone(), checks)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    if domain_loss is not None:  # training only: the same per-token losses, summed per sample's domain
        domain_loss.add(dataset_id, losses.detach().view(loss_mask.shape), mask.view(loss_mask.shape))
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, checks: LossChecks = LossChecks(), domain_loss=None, token_ids=None):
    """``domain_loss`` (engine/domain_loss.py, None = off) collects training losses per domain;
    evaluation (the model in eval mode) is left out of it. ``token_ids`` checks every micro-batch's
    ids, training and evaluation (engine/token_ids.py, None = off)."""
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    domain_loss = domain_loss if model.training else None
    checks = checks if model.training else checks.for_evaluation()
    crash_if_injected(checks)
    batch = get_batch(data_iterator, with_dataset_id=domain_loss is not None, token_ids=token_ids)
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(
        loss_func, batch["loss_mask"], checks=checks, domain_loss=domain_loss, dataset_id=batch.get("dataset_id")
    )
