"""The converter's outputs: refused when they exist (unless --overwrite), checked before any work;
they are then written through ellama_megatron.formats.atomic.staged_output."""

from __future__ import annotations

from pathlib import Path

from ellama_megatron.convert.hf_checkpoint import ConversionError


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checked before any work: an existing output is only replaced with --overwrite."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")
