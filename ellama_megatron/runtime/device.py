"""Which device a single-process tool (evaluation, --verify) runs on: the same answer everywhere."""

from __future__ import annotations

import torch


def pick_device(device: str, flag: str = "--device") -> str:
    """``auto``: the GPU when there is one; ``cpu``, ``cuda`` or ``cuda:N`` as given, refused
    (ValueError naming ``flag``) when it cannot run in this process."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"{flag} {device}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: no GPU is visible to this process (use cpu or auto)")
    return device
