"""Recognising Megatron checkpoints among merge/evaluation inputs.

Merging torch_dist checkpoints directly and evaluating them through the engine need the
converter and engine; until they are wired in, such inputs are refused with the way around it.
"""

from __future__ import annotations

from pathlib import Path


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A Megatron save folder (``latest_checkpointed_iteration.txt`` / ``iter_*``) or one torch_dist iteration."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "latest_checkpointed_iteration.txt").exists() or any(p.glob("iter_[0-9]*")):
        return True
    return (p / ".metadata").exists() and ((p / "common.pt").exists() or (p / "metadata.json").exists())


def refuse_megatron_checkpoint(path: str | Path, role: str, action: str) -> None:
    if is_megatron_checkpoint(path):
        raise ValueError(
            f"{role} {path} is a Megatron checkpoint; {action} of Megatron checkpoints is not supported yet. "
            "Export it to a Hugging Face folder first (the converter's HF export), then pass that folder."
        )
