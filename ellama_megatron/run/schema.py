"""The schema of the config groups a run is planned and started from (parallel, train, cluster,
optim, checkpoint, logging, resilience; the model's is LlamaConfig, the data's the blend plan's): each
key's type, and the checks that concern one key alone next to it (the rules between keys of the
layout are RunPlan.problems).

The values and their defaults live in the presets (ellama_megatron/conf/<group>/*.yaml, which
inherit from one another), not here: a field without a default is one the preset must give. The
schemas are registered in Hydra's ConfigStore (``register``), so composition already checks types;
a group is read through ``typed(cfg, group)``, which also refuses a key the schema does not know
(Hydra's ``+group.key=`` adds one), naming it; RunPlan reads its numbers from there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys and the fix."""


ACCELERATORS = ("cpu", "gpu")
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 on a GPU, fp32 on a CPU (run/plan.py)
LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD", "inverse-square-root")  # Megatron's
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")  # Megatron's --lr-wsd-decay-style
SAVE_INTERVAL_AUTO = "auto"  # checkpoint.save_interval: the Young/Daly interval of the run (RunPlan.save_interval)
TRAIN_LOSS_LEVELS = ("group", "source")  # logging.train_loss_by: per data group, or per group and source


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = MISSING  # TP: each layer's matrices over GPUs of a node
    pipeline_model_parallel_size: int = MISSING  # PP: the layers in stages
    context_parallel_size: int = MISSING  # CP: the sequence
    virtual_pipeline_model_parallel_size: int | None = MISSING  # interleaved chunks per stage; None = off
    sequence_parallel: bool = MISSING
    use_distributed_optimizer: bool = MISSING
    recompute_granularity: str | None = MISSING  # null, selective or full (checked by RunPlan)
    recompute_num_layers: int | None = MISSING  # with full recomputation: layers per chunk


@dataclasses.dataclass
class TrainConfig:
    seq_length: int = MISSING
    micro_batch_size: int = MISSING
    global_batch_size: int = MISSING
    train_tokens: float = MISSING  # the budget; iterations are derived (RunPlan.train_iterations)
    eval_interval: int = MISSING
    eval_iters: int = MISSING
    eval_at_start: bool = MISSING  # validate before the first step too (iteration 0): the starting model's losses
    log_interval: int = MISSING
    seed: int = MISSING
    exit_interval: int | None = MISSING
    exit_duration_in_mins: int | None = MISSING  # the Slurm launcher sets it from the job's time left

    def problems(self) -> list[str]:
        """Values Megatron would divide by or assert on inside the ranks, refused by key here."""
        errors = [
            f"train.{key}={getattr(self, key)} must be at least 1"
            for key in ("seq_length", "micro_batch_size", "global_batch_size", "eval_interval", "log_interval")
            if getattr(self, key) < 1
        ]
        if not self.train_tokens > 0:  # also catches NaN
            errors.append(f"train.train_tokens={self.train_tokens} must be positive (the token budget)")
        if self.eval_iters < 0:
            errors.append(f"train.eval_iters={self.eval_iters} must be 0 or more")
        return errors


@dataclasses.dataclass
class ClusterConfig:
    name: str = MISSING
    accelerator: str = MISSING  # one of ACCELERATORS
    nodes: int = MISSING
    procs_per_node: int = MISSING  # ranks per node: one per GPU
    gpu_memory_gb: float | None = MISSING  # what the memory planner checks against; None = no check
    gpu_peak_tflops: float | None = MISSING  # dense bf16 peak, for MFU and the step time; None = not reported
    # What the save interval is planned from (RunPlan.save_interval, docs/planner.md):
    node_mtbf_hours: float = MISSING  # mean time between failures that stop a job, per node
    checkpoint_write_gb_per_s: float = MISSING  # GB/s one node writes a checkpoint at; the job's is nodes x this
    expected_mfu: float | None = MISSING  # MFU (the planner's FLOPs count) the step time is estimated at; None = none

    def problems(self) -> list[str]:
        if self.accelerator not in ACCELERATORS:
            return [f"cluster.accelerator={self.accelerator!r} must be cpu or gpu"]
        errors = [
            f"cluster.{key}={getattr(self, key)} must be positive{why}"
            for key, why in (
                ("node_mtbf_hours", " (hours between failures of one node)"),
                ("checkpoint_write_gb_per_s", " (GB/s a node writes checkpoints at; measure it, see docs/planner.md)"),
            )
            if not getattr(self, key) > 0  # also catches NaN
        ]
        if self.gpu_peak_tflops is not None and not self.gpu_peak_tflops > 0:
            errors.append(f"cluster.gpu_peak_tflops={self.gpu_peak_tflops} must be positive, or null (not reported)")
        if self.expected_mfu is not None and not 0 < self.expected_mfu <= 1:
            errors.append(
                f"cluster.expected_mfu={self.expected_mfu} must be in (0, 1] (a fraction of the GPU's peak), "
                "or null (no step-time estimate)"
            )
        return errors


@dataclasses.dataclass
class OptimConfig:
    lr: float = MISSING
    min_lr: float = MISSING
    lr_decay_style: str = MISSING  # one of LR_DECAY_STYLES
    lr_warmup_fraction: float = MISSING
    lr_warmup_init: float = MISSING  # LR at the start of warmup (Megatron's --lr-warmup-init)
    lr_wsd_decay_style: str = MISSING  # one of WSD_DECAY_STYLES: WSD's final decay
    lr_wsd_decay_fraction: float = MISSING  # WSD: the final decay's share of the iterations
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_eps: float = MISSING
    weight_decay: float = MISSING
    clip_grad: float = MISSING
    precision: str = MISSING  # one of PRECISIONS

    def problems(self) -> list[str]:
        errors = []
        if not self.lr > 0:  # also catches NaN
            errors.append(f"optim.lr={self.lr} must be positive")
        if not self.min_lr >= 0:
            errors.append(f"optim.min_lr={self.min_lr} must be 0 or more")
        elif self.lr > 0 and self.min_lr > self.lr:
            errors.append(
                f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; the schedule decays from lr "
                "to min_lr, so set min_lr <= lr"
            )
        if not 0.0 <= self.lr_warmup_fraction < 1.0:  # Megatron asserts warmup < decay iterations
            errors.append(f"optim.lr_warmup_fraction={self.lr_warmup_fraction} must be in [0, 1)")
        if not 0.0 <= self.lr_warmup_init <= max(self.lr, 0.0):  # Megatron asserts init_lr <= max_lr
            errors.append(
                f"optim.lr_warmup_init={self.lr_warmup_init} must be in [0, optim.lr={self.lr}]: warmup "
                "rises from it to the peak"
            )
        if self.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            errors.append(
                f"optim.lr_wsd_decay_style={self.lr_wsd_decay_style!r} must be one of {', '.join(WSD_DECAY_STYLES)}"
            )
        if self.lr_decay_style == "WSD" and not (0.0 < self.lr_wsd_decay_fraction <= 1.0 - self.lr_warmup_fraction):
            errors.append(
                f"optim.lr_wsd_decay_fraction={self.lr_wsd_decay_fraction} must be in (0, 1 - "
                f"lr_warmup_fraction={1.0 - self.lr_warmup_fraction:g}]: the decay follows the warmup"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            errors.append(f"optim.lr_decay_style={self.lr_decay_style!r} is not a Megatron decay style")
        if self.precision not in PRECISIONS:
            errors.append(f"optim.precision={self.precision!r} must be auto, bf16 or fp32")
        return errors


@dataclasses.dataclass
class CheckpointConfig:
    init_from: str | None = MISSING  # a converted base model: weights only, iteration 0; None = random init
    save_interval: int | str = MISSING  # iterations between saves, or SAVE_INTERVAL_AUTO (RunPlan.save_interval)
    format: str = MISSING  # Megatron's --ckpt-format
    async_save: bool = MISSING  # GPU only
    save_optim: bool = MISSING  # needed to resume
    keep_last: int | None = MISSING  # the newest K complete checkpoints are kept; None = all are kept
    keep_every: int | None = MISSING  # also kept: iterations divisible by N (save_interval must divide N; auto does)
    export_hf: bool = MISSING  # when the run finishes, its final model as a Hugging Face folder in ${run_dir}/hf

    def problems(self) -> list[str]:
        auto = self.save_interval == SAVE_INTERVAL_AUTO
        if isinstance(self.save_interval, str) and not auto:
            return [
                f"checkpoint.save_interval={self.save_interval!r} must be a number of iterations or "
                f"{SAVE_INTERVAL_AUTO} (the Young/Daly interval, docs/planner.md)"
            ]
        if not auto and self.save_interval < 1:
            return [f"checkpoint.save_interval={self.save_interval} must be at least 1 (iterations between saves)"]
        errors = []
        if self.keep_last is not None and self.keep_last < 1:
            errors.append(
                f"checkpoint.keep_last={self.keep_last} must be at least 1 (the checkpoint a relaunch "
                "resumes from), or null to keep every checkpoint"
            )
        if self.keep_every is not None and auto and self.keep_every < 1:
            # With auto, the interval is resolved to a divisor of keep_every (RunPlan.save_interval).
            errors.append(f"checkpoint.keep_every={self.keep_every} must be at least 1, or null to keep none")
        elif self.keep_every is not None and not auto and (self.keep_every < 1 or self.keep_every % self.save_interval):
            errors.append(
                f"checkpoint.keep_every={self.keep_every} must be a positive multiple of "
                f"checkpoint.save_interval={self.save_interval} (only saved iterations can be kept)"
            )
        return errors


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = MISSING
    wandb_project: str | None = MISSING  # None = no Weights & Biases
    wandb_entity: str | None = MISSING
    log_throughput: bool = MISSING
    log_memory: bool = MISSING
    train_loss_by: str | None = MISSING  # None, or one of TRAIN_LOSS_LEVELS (engine/domain_loss.py)
    straggler_factor: float | None = MISSING  # a rank this many times the median compute is slow; None = off
    straggler_intervals: int = MISSING  # ... for this many log intervals in a row: an events.jsonl entry
    megatron_straggler: int | None = MISSING  # GPU: Megatron's --log-straggler, reporting this many ranks

    def problems(self) -> list[str]:
        errors = []
        if self.train_loss_by is not None and self.train_loss_by not in TRAIN_LOSS_LEVELS:
            errors.append(f"logging.train_loss_by={self.train_loss_by!r} must be group, source or null (off)")
        if self.straggler_factor is not None and self.straggler_factor <= 1:
            errors.append(
                f"logging.straggler_factor={self.straggler_factor} must be above 1 (a rank slower than the "
                "median by this factor), or null to stop measuring"
            )
        if self.straggler_intervals < 1:
            errors.append(f"logging.straggler_intervals={self.straggler_intervals} must be at least 1")
        if self.megatron_straggler is not None and self.megatron_straggler < 1:
            errors.append(
                f"logging.megatron_straggler={self.megatron_straggler} must be at least 1 (ranks to report), "
                "or null (off)"
            )
        return errors


RERUN_MODES = ("validate_results", "disabled")  # Megatron's --rerun-mode values a training run can use
SPIKE_POLICIES = ("stop", "skip", "rollback")  # what a rejected loss does to the run (docs/engine.md, resilience)
ERROR_INJECTION_TYPES = ("transient_error", "persistent_error", "correct_result")  # Megatron's --error-injection-type
INJECTED_LOSS_KINDS = ("nan", "spike")  # tests: what resilience.inject_loss_at makes of that iteration's loss


@dataclasses.dataclass
class ResilienceConfig:
    rerun_mode: str = MISSING  # one of RERUN_MODES
    check_nan: bool = MISSING  # NaN/Inf in the loss and in the gradients
    check_token_ids: bool = MISSING  # every micro-batch's ids against the vocabulary (engine/token_ids.py)
    spike_factor: float | None = MISSING  # a loss this many times the reference is rejected; None = off
    spike_window: int = MISSING  # the reference: the largest of the run's first this-many accepted micro-batch losses
    spike_policy: str = MISSING  # one of SPIKE_POLICIES
    max_relaunches: int = MISSING  # skip/rollback: relaunches after rejected losses before the run stops
    rollback_distance: int = MISSING  # rollback: resume from the newest checkpoint at least this many iterations back
    iterations_to_skip: list[int] = (
        MISSING  # Megatron's --iterations-to-skip: 1-based iterations whose data is passed over
    )
    error_injection_rate: int = MISSING  # tests: Megatron rejects one result in this many; 0 = never
    error_injection_type: str = MISSING  # Megatron's: transient_error, persistent_error or correct_result
    inject_loss_at: int | None = MISSING  # tests: this 1-based iteration's loss is made bad each time it runs
    inject_loss_kind: str = MISSING  # one of INJECTED_LOSS_KINDS
    inject_crash_at: int | None = MISSING  # tests: the last rank raises in this 1-based iteration, each time it runs
    # Cluster faults (run/faults.py): the retry rules
    max_same_failure: int = MISSING  # the same failure at the same checkpoint this many times in a row: stop
    max_failures_without_progress: int = MISSING  # failures of any kind without a newer checkpoint: stop
    min_nodes: int | None = MISSING  # opt-in: go on with as few as this many nodes when the partition lacks them
    # Hangs (launch/watchdog.py): a rank not advancing within its phase's timeout, in seconds
    hang_detection: bool = MISSING
    hang_poll_s: float = MISSING  # how often the watchdog reads the heartbeats
    hang_setup_s: float = MISSING  # from the launch to the first step, and steps before a median step time exists
    hang_step_factor: float = MISSING  # a step: this many times the rank's median step time ...
    hang_step_min_s: float = MISSING  # ... but at least this ...
    hang_step_max_s: float = MISSING  # ... and at most this
    hang_save_s: float = MISSING  # a checkpoint save
    hang_eval_s: float = MISSING  # a validation pass

    def problems(self) -> list[str]:
        errors = []
        if self.max_same_failure < 1:
            errors.append(f"resilience.max_same_failure={self.max_same_failure} must be at least 1")
        if self.min_nodes is not None and self.min_nodes < 1:
            errors.append(f"resilience.min_nodes={self.min_nodes} must be at least 1, or null (never fewer nodes)")
        if self.max_failures_without_progress < 1:
            errors.append(
                f"resilience.max_failures_without_progress={self.max_failures_without_progress} must be at least 1"
            )
        for key in (
            "hang_poll_s",
            "hang_setup_s",
            "hang_step_factor",
            "hang_step_min_s",
            "hang_step_max_s",
            "hang_save_s",
            "hang_eval_s",
        ):
            if getattr(self, key) <= 0:
                errors.append(f"resilience.{key}={getattr(self, key)} must be above 0")
        if self.hang_step_min_s > self.hang_step_max_s:
            errors.append(
                f"resilience.hang_step_min_s={self.hang_step_min_s} must not exceed "
                f"resilience.hang_step_max_s={self.hang_step_max_s}"
            )
        if self.rerun_mode not in RERUN_MODES:
            errors.append(f"resilience.rerun_mode={self.rerun_mode!r} must be one of {', '.join(RERUN_MODES)}")
        if self.spike_policy not in SPIKE_POLICIES:
            errors.append(f"resilience.spike_policy={self.spike_policy!r} must be one of {', '.join(SPIKE_POLICIES)}")
        if self.max_relaunches < 0:
            errors.append(f"resilience.max_relaunches={self.max_relaunches} must be 0 or more")
        if self.rollback_distance < 2:
            errors.append(
                f"resilience.rollback_distance={self.rollback_distance} must be at least 2: the checkpoint "
                "one iteration before the rejected one holds the model that produced the rejected loss "
                "(resuming from it is spike_policy=skip)"
            )
        if self.spike_policy != "stop" and self.rerun_mode == "disabled":
            errors.append(
                f"resilience.spike_policy={self.spike_policy} needs resilience.rerun_mode=validate_results "
                "(with reruns disabled a rejected loss raises, nothing is saved for the relaunch)"
            )
        if self.inject_loss_kind not in INJECTED_LOSS_KINDS:
            errors.append(
                f"resilience.inject_loss_kind={self.inject_loss_kind!r} must be one of {', '.join(INJECTED_LOSS_KINDS)}"
            )
        if self.spike_factor is not None and self.spike_factor <= 1:
            errors.append(
                f"resilience.spike_factor={self.spike_factor} must be above 1 (or null to turn the check off)"
            )
        if self.spike_window < 1:
            errors.append(f"resilience.spike_window={self.spike_window} must be at least 1")
        if self.error_injection_type not in ERROR_INJECTION_TYPES:
            errors.append(
                f"resilience.error_injection_type={self.error_injection_type!r} must be one of "
                f"{', '.join(ERROR_INJECTION_TYPES)}"
            )
        return errors


SCHEMAS = {
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "cluster": ClusterConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "resilience": ResilienceConfig,
}


def register() -> None:
    """Store each group's schema as ``schema/<group>`` in Hydra's ConfigStore: conf/config.yaml's
    defaults list puts them under the presets, so a preset or override of the wrong type fails
    at composition. Done on import of this module (every recipe and tool imports it before it
    composes); where it is not (a bare ``compose`` elsewhere), the entries are optional and
    ``typed`` checks the same types after the fact."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group="schema", name=group, node=schema)


register()


def typed(cfg: Any, group: str):
    """The composed ``group`` of ``cfg`` as its schema's dataclass; ConfigError naming the key when a
    value has the wrong type, a key is unknown or a key is missing."""
    node = cfg[group]
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(node)
    schema = SCHEMAS[group]
    # Checked here, not left to the merge: a typed node takes Hydra's `+group.key=` and drops it silently.
    unknown = sorted(set(node.keys()) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]}: not a key of {group} (unknown: {', '.join(unknown)}; "
            f"see ellama_megatron/run/schema.py {schema.__name__} and ellama_megatron/conf/{group}/)"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"{group}.{key}: {exc.msg if hasattr(exc, 'msg') else exc}".split("\n")[0]
            + f" (see ellama_megatron/run/schema.py {schema.__name__} and "
            f"ellama_megatron/conf/{group}/)"
        ) from None
