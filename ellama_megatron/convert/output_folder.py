"""The converter's outputs: refused when they exist (unless --overwrite), then staged and renamed."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ellama_megatron.convert.hf_checkpoint import ConversionError
from ellama_megatron.formats.atomic import staged_output as staged_folder


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checked before any work: an existing output is only replaced with --overwrite."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool):
    """``ellama_megatron.formats.atomic.staged_output`` after the converter's --overwrite check."""
    refuse_existing(out, overwrite)
    with staged_folder(out) as tmp:
        yield tmp
