"""The CPU runtime patches internals of the pinned Megatron: fail loudly when one of them moves."""

import importlib
import inspect

import pytest

from ellama_megatron.runtime import cpu, wheel_fixes

PATCHED = cpu.PATCHED_ATTRIBUTES + wheel_fixes.PATCHED_ATTRIBUTES
PINNED = cpu.PINNED_SOURCE_FACTS + wheel_fixes.PINNED_SOURCE_FACTS


def _resolve(dotted: str):
    """A module, or a class inside one (``package.module.Class``)."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module,attribute", PATCHED)
def test_patched_attribute_exists(module, attribute):
    assert hasattr(_resolve(module), attribute), f"{module}.{attribute} is gone: update ellama_megatron/runtime"


@pytest.mark.parametrize("module,line", PINNED)
def test_pinned_source_still_needs_the_patch(module, line):
    source = inspect.getsource(importlib.import_module(module))
    assert line in source, f"{module} no longer contains {line!r}: the CPU patch for it may be obsolete or wrong"


def test_megatron_version_is_the_pinned_one():
    from importlib.metadata import version

    assert version("megatron-core") == "0.19.2", "ellama_megatron.runtime.cpu is written against 0.19.2"


def test_cuda_to_cpu_mode_maps_factories():
    import torch

    with cpu.CudaToCpuMode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2, device=0).device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"


def test_full_recompute_can_save_the_rng_state():
    """Full recompute saves the CUDA RNG state through torch.cuda.random, not torch.cuda: mapped too
    (recompute_granularity=full on CPU failed with 'Found no NVIDIA driver')."""
    import subprocess
    import sys

    code = (
        "from ellama_megatron.runtime.cpu import apply_cpu_runtime\n"
        "assert apply_cpu_runtime()\n"
        "from megatron.core.tensor_parallel.random import _get_all_rng_states\n"
        "cpu_state, cuda_state, _ = _get_all_rng_states()\n"
        "assert cpu_state.numel() > 0 and cuda_state.numel() == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_frozen_imports_with_the_collector_off_and_turns_it_back_on():
    import gc
    import sys

    from ellama_megatron.runtime.frozen_imports import import_frozen

    seen = []
    gc.callbacks.append(lambda phase, info: seen.append(phase))
    try:
        sys.modules.pop("colorsys", None)
        import_frozen("colorsys")
        assert "colorsys" in sys.modules and gc.isenabled() and gc.get_freeze_count() > 0
        assert not seen, "the collector ran during the import"
        gc.disable()
        import_frozen("colorsys")
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()
        gc.callbacks.pop()
