"""Tokens per second per GPU, next to Megatron's own TFLOP/s line.

Megatron 0.19.2 logs model TFLOP/s per GPU but not tokens/s, the number continued-pretraining
budgets are written in. We wrap its ``training_log`` (called once per iteration from ``train``) and,
on each logging iteration, print and record tokens/s/GPU over the interval since the last one.
"""

from __future__ import annotations

import functools
import time


def install_tokens_per_second_log() -> None:
    from megatron.training import training

    original = training.training_log
    state = {"time": None, "iteration": None}

    @functools.wraps(original)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        megatron_args = training.get_args()
        if iteration % megatron_args.log_interval:
            return result
        now = time.time()
        if state["time"] is not None and iteration > state["iteration"]:
            tokens = (iteration - state["iteration"]) * megatron_args.global_batch_size * megatron_args.seq_length
            per_gpu = tokens / (now - state["time"]) / megatron_args.world_size
            if training.is_last_rank():
                print(f" iteration {iteration:8d} | tokens per second per GPU: {per_gpu:.1f} |", flush=True)
                writer = training.get_tensorboard_writer()
                if writer:
                    writer.add_scalar("tokens-per-sec-per-gpu", per_gpu, iteration)
                wandb_writer = training.get_wandb_writer()
                if wandb_writer:
                    wandb_writer.log({"tokens-per-sec-per-gpu": per_gpu}, iteration)
        state["time"], state["iteration"] = now, iteration
        return result

    training.training_log = training_log
