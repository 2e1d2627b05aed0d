"""The CPU runtime patches internals of the pinned Megatron: fail loudly when one of them moves."""

import importlib
import inspect

import pytest

from ellama_megatron.runtime import cpu


@pytest.mark.parametrize("module,attribute", cpu.PATCHED_ATTRIBUTES)
def test_patched_attribute_exists(module, attribute):
    if module == "torch.Tensor":
        import torch

        assert hasattr(torch.Tensor, attribute)
        return
    mod = importlib.import_module(module)
    assert hasattr(mod, attribute), f"{module}.{attribute} is gone: update ellama_megatron/runtime/cpu.py"


@pytest.mark.parametrize("module,line", cpu.PINNED_SOURCE_FACTS)
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
