"""Four defects of the megatron-core 0.19.2 wheel that break runs on GPU as well as CPU.

1. ``compile_helpers`` runs ``make`` on a Makefile the wheel does not ship, and exits on failure,
   although the compiled dataset helpers are in the wheel.
2. Without apex or Transformer Engine (plain PyTorch installs), resuming with the distributed
   optimizer fails: ``DistributedOptimizer.state_dict`` reads Adam's ``step`` from the optimizer
   state (distrib_optimizer.py, ``assert len(steps) == 1``), but torch's Adam creates its state
   lazily at the first step, so on load the state is empty. We create it (zeros, step 0) before
   the loading state dict is built; the checkpoint then overwrites it. Its ``load_state_dict`` then
   gives every parameter's state the *same* ``step`` tensor, which torch's foreach Adam increments
   once per parameter: from the second step after a resume the bias correction is wrong and the
   losses leave those of an uninterrupted run. Each state gets its own copy.
3. The resume paths copy checkpoint tensors into every entry of a parameter's optimizer state.
   torch's Adam has a ``step`` entry the checkpoint does not hold per parameter (KeyError 'step'
   with fully reshardable optimizer checkpoints): entries the checkpoint lacks keep their value.
   And in fp32 runs the main params are views of the model's parameters, copied into with grad
   tracking on ("a view of a leaf Variable that requires grad is being used in an in-place
   operation"): the copy runs under ``torch.no_grad()``.

4. A checkpoint saved for a rerun (a rejected loss reproduced: the model from before iteration k,
   with the rerun state machine's state WILL_RERUN_FROM_CHECKPOINT) is re-run on load even when
   ``--iterations-to-skip`` passes over iteration k: the skip's dummy step consumes that state, the
   next iteration runs no forward-backward at all and the run exits 17. A pending rerun of an
   iteration that is skipped is ignored (run/recovery.py's skip and rollback resume from there, as
   Megatron's own skip of an iteration from its rejection log would).

All are applied by ``apply_wheel_fixes`` in every run; tests/test_cpu_runtime.py checks the pins.
"""

from __future__ import annotations

import functools
import importlib

PATCHED_ATTRIBUTES: list[tuple[str, str]] = [
    ("megatron.core.datasets.utils", "compile_helpers"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "sharded_state_dict"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "load_state_dict"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_set_main_param_and_optimizer_states"),
    ("megatron.core.rerun_state_machine.RerunStateMachine", "validate_state_dict"),
]
PINNED_SOURCE_FACTS: list[tuple[str, str]] = [
    ("megatron.core.datasets.utils", 'command = ["make", "-C"'),
    (
        "megatron.core.optimizer.distrib_optimizer",
        'steps = list(set([s["step"].item() for s in inner_state_dict["state"].values()]))',
    ),
    ("megatron.core.optimizer.distrib_optimizer", "dst_tensors[key].copy_(tensors[key])"),
    ("megatron.core.optimizer.distrib_optimizer", 's["step"] = step'),
    (
        "megatron.core.rerun_state_machine",
        "if 'state' not in state_dict or state_dict['state'] == RerunState.NOT_RUNNING_YET:",
    ),
    ("megatron.training.training", "rerun_state_machine.current_iteration = iteration"),
]

_applied = False


def fix_compile_helpers() -> None:
    utils = importlib.import_module("megatron.core.datasets.utils")
    original = utils.compile_helpers

    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()

    utils.compile_helpers = compile_helpers


def _create_empty_adam_state(torch_optimizer) -> None:
    import torch

    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            if param not in torch_optimizer.state or not torch_optimizer.state[param]:
                torch_optimizer.state[param] = {  # the keys and shapes torch's Adam creates
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def fix_distributed_optimizer_resume() -> None:
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if distrib.HAVE_APEX_OR_TE:
        return  # fused Adam keeps a global step: Megatron's own path works
    cls = distrib.DistributedOptimizer
    original = cls.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, *args, **kwargs):
        loading = kwargs.get("is_loading") or (len(args) > 1 and args[1])
        if not loading or self.optimizer.state:
            return original(self, *args, **kwargs)
        _create_empty_adam_state(self.optimizer)
        result = original(self, *args, **kwargs)
        # The loaders fill exp_avg/exp_avg_sq in place and take ``step`` from the param groups.
        for state in self.optimizer.state.values():
            state.pop("step", None)
        return result

    cls.sharded_state_dict = sharded_state_dict
    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict


def fix_fp32_resume_copy() -> None:
    import torch

    cls = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        tensors = {**{k: v for k, v in state.items() if k not in tensors}, **tensors}
        with torch.no_grad():
            return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def fix_rerun_of_a_skipped_iteration() -> None:
    cls = importlib.import_module("megatron.core.rerun_state_machine").RerunStateMachine
    original = cls.validate_state_dict

    @functools.wraps(original)
    def validate_state_dict(self, state_dict):
        if not original(self, state_dict):
            return False
        from megatron.training import get_args

        # The machine's counter during iteration k (1-based, as --iterations-to-skip counts) is k, not
        # k-1 as its docstring says: training.py sets it to the loop's 0-based iteration before the
        # increment of the step (pinned above).
        pending = state_dict["current_iteration"]
        return pending not in (get_args().iterations_to_skip or [])

    cls.validate_state_dict = validate_state_dict


def apply_wheel_fixes() -> None:
    global _applied
    if _applied:
        return
    fix_compile_helpers()
    fix_distributed_optimizer_resume()
    fix_fp32_resume_copy()
    fix_rerun_of_a_skipped_iteration()
    _applied = True
