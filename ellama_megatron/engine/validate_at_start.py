"""Validation at iteration 0 (train.eval_at_start): the starting model's per-domain losses, before
any step.

Megatron 0.19.2 validates only after a step whose number is a multiple of eval_interval, so a
continued-pretraining curve starts one interval in and the base model's own loss on the same
validation sets (the point the curve is measured against) never shows. We wrap its ``train`` (called
once from ``pretrain``) and run Megatron's own ``evaluate_and_print_results`` first, on the same
validation iterators, with the prefix its periodic passes use: the log line is the usual
``validation-<domain> loss at iteration 0 | ...``, and TensorBoard gets the point at step 0.

A resumed run (the loaded iteration is past 0) validated its start when it first started: skipped.
"""

from __future__ import annotations

import functools


def install_validation_at_start() -> None:
    from megatron.training import training

    original = training.train

    @functools.wraps(original)
    def train(
        forward_step_func,
        model,
        optimizer,
        opt_param_scheduler,
        train_data_iterator,
        valid_data_iterator,
        process_non_loss_data_func,
        config,
        checkpointing_context,
        non_loss_data_func,
        *args,
        **kwargs,
    ):
        megatron_args = training.get_args()
        if megatron_args.iteration == 0 and megatron_args.do_valid and valid_data_iterator is not None:
            training.evaluate_and_print_results(
                "iteration 0",
                forward_step_func,
                valid_data_iterator,
                model,
                0,
                process_non_loss_data_func,
                config,
                verbose=False,
                write_to_tensorboard=True,
                non_loss_data_func=non_loss_data_func,
                pg_collection=kwargs.get("pg_collection"),
                p2p_communicator=kwargs.get("p2p_communicator"),
            )
        return original(
            forward_step_func,
            model,
            optimizer,
            opt_param_scheduler,
            train_data_iterator,
            valid_data_iterator,
            process_non_loss_data_func,
            config,
            checkpointing_context,
            non_loss_data_func,
            *args,
            **kwargs,
        )

    training.train = train
