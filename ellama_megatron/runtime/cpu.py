"""Run Megatron-Core 0.19.2's own training loop on a machine without a GPU (gloo, fp32).

Megatron assumes CUDA in about a dozen places (each found by removing its adaptation and
watching a tiny CPU run fail; listed below and in docs/engine.md). Rather than fork
its code, this module adapts those calls in one place, and only when no GPU is present:

  1. ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda=True``      -> wrapped
  2. with ``device_count() == 0`` it skips model-parallel initialisation     -> we initialise it
  3. ``compile_helpers`` runs ``make`` on a Makefile the wheel lacks          -> runtime/wheel_fixes.py
     (a GPU run needs that fix too, as it needs the distributed-optimizer resume fix there)
  4. ``torch.cuda.current_device()`` is used as a device                      -> returns the CPU device
  5. ``torch.cuda.synchronize()``                                             -> no-op
  6. ``torch.cuda.Stream/current_stream/stream``                              -> inert stand-ins
  7. ``torch.cuda.get_rng_state/set_rng_state`` in checkpointing, and         -> empty state / no-op
     ``torch.cuda.random.get_rng_state`` in full recompute's RNG capture
  8. argument validation and TP>1 set-up read CUDA properties                 -> env + stand-ins
  9. ~100 ``device="cuda"`` / ``.cuda()`` / ``.to("cuda")`` in Megatron        -> a TorchFunctionMode
 10. ``param.grad.type() == 'torch.cuda.FloatTensor'`` asserts                -> CPU float types report
     their CUDA name
 11. ``jit_fuser`` = torch.compile: inductor builds C++ kernels for every fused op at start-up
     (about 20 s of a tiny run, no gain on CPU)                                -> dynamo disabled
 12. ``_warmup_jit_function`` draws ``torch.rand(..., device="cuda")`` of TP-dependent sizes
     (ffn_hidden_size // TP) between seeding and model construction. On a GPU that consumes the
     CUDA generator; mapped to the CPU by (9) it consumed the CPU generator that
     ``--use-cpu-initialization`` builds the weights from, so TP=2 started from other weights
     than TP=1 (first loss 6.2155 vs 6.2438)                                  -> run with the CPU
     generator's state saved and restored, as on a GPU

``PATCHED_ATTRIBUTES`` names every attribute replaced; tests/test_cpu_runtime.py fails when one of
them no longer exists in the pinned Megatron, so an upgrade cannot silently turn a patch into a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch
from torch.overrides import TorchFunctionMode

# (module, attribute) pairs this module replaces; checked by tests against the installed Megatron.
PATCHED_ATTRIBUTES: list[tuple[str, str]] = [
    ("megatron.training.training", "initialize_megatron"),
    ("megatron.training.initialize", "_initialize_distributed"),
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "Stream"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "stream"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda.random", "get_rng_state"),
    ("torch.cuda", "set_device"),
    ("torch.cuda", "get_device_capability"),
    ("torch.Tensor", "type"),
    ("megatron.training.arguments", "get_device_arch_version"),
    ("megatron.training.initialize", "_warmup_jit_function"),
]

# Megatron source lines whose presence makes a patch necessary; if one disappears, the test tells
# us that the patch may be obsolete (or must move).
PINNED_SOURCE_FACTS: list[tuple[str, str]] = [
    ("megatron.training.initialize", 'assert torch.cuda.is_available(), "Megatron requires CUDA."'),
    ("megatron.training.initialize", "if device_count > 0 and not skip_model_parallel_init:"),
    ("megatron.core.optimizer.clip_grads", "assert param.grad.type() == 'torch.cuda.FloatTensor'"),
    ("megatron.core.tensor_parallel.random", "return torch.cuda.random.get_rng_state(device=device)"),
    (
        "megatron.training.initialize",
        'args.ffn_hidden_size // args.tensor_model_parallel_size, dtype=dtype, device="cuda"',
    ),
]

_applied = False


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal in torch's API
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Maps every tensor factory / ``.to()`` / ``.cuda()`` that asks for CUDA onto the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for torch.cuda.Stream: waits and records are meaningless on one CPU stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_tensor_type(original):
    cuda_names = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if name in cuda_names else name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _keep_cpu_rng(warmup):
    """The JIT warm-up's random inputs must not advance the CPU generator (see 12 above): on a
    GPU they come from the CUDA generator, and the CPU one must reach the model build untouched
    so that every TP size cuts its shards from the same master weights."""

    @functools.wraps(warmup)
    def warmup_keeping_cpu_rng(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return warmup(*args, **kwargs)

    return warmup_keeping_cpu_rng


def _initialize_model_parallel_from_args(get_embedding_ranks=None, get_position_embedding_ranks=None) -> None:
    """What Megatron's _initialize_distributed does after init_process_group when it sees GPUs."""
    from megatron.core import parallel_state as mpu
    from megatron.training.global_vars import get_args

    args = get_args()
    if mpu.model_parallel_is_initialized():
        return
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        get_embedding_ranks=get_embedding_ranks,
        get_position_embedding_ranks=get_position_embedding_ranks,
    )


def apply_cpu_runtime(force: bool = False) -> bool:
    """Adapt Megatron to a CPU-only process. Returns True when applied (no GPU, or ``force``)."""
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import torch._dynamo.config as dynamo_config

    dynamo_config.disable = True

    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    cuda.set_rng_state = lambda *a, **k: None
    # Megatron's recompute (tensor_parallel/random.py) asks the submodule, not torch.cuda.
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.set_device = lambda *a, **k: None
    # Read by argument validation and TP set-up to pick kernels; Hopper answers are harmless here.
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.Tensor.type = _cpu_tensor_type(torch.Tensor.type)
    arguments = importlib.import_module("megatron.training.arguments")
    arguments.get_device_arch_version = lambda: 9  # TP/CP validation asks for the GPU generation

    training = importlib.import_module("megatron.training.training")
    initialize = importlib.import_module("megatron.training.initialize")
    original_init = training.initialize_megatron
    original_dist = initialize._initialize_distributed

    @functools.wraps(original_init)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    @functools.wraps(original_dist)
    def _initialize_distributed(
        get_embedding_ranks, get_position_embedding_ranks, store, skip_model_parallel_init=False
    ):
        result = original_dist(get_embedding_ranks, get_position_embedding_ranks, store, skip_model_parallel_init)
        if not skip_model_parallel_init:
            _initialize_model_parallel_from_args(get_embedding_ranks, get_position_embedding_ranks)
        return result

    training.initialize_megatron = initialize_megatron
    initialize._initialize_distributed = _initialize_distributed
    # set_jit_fusion_options looks it up in this module's globals at call time.
    initialize._warmup_jit_function = _keep_cpu_rng(initialize._warmup_jit_function)

    CudaToCpuMode().__enter__()  # stays on for the life of the process
    _applied = True
    return True
