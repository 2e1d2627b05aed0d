"""Outputs appear complete or not at all: written under a temporary sibling name, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ellama_megatron.convert.hf_checkpoint import ConversionError


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checked before any work: an existing output is only replaced with --overwrite."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool):
    """Yields an empty temporary folder next to ``out``; renames it to ``out`` when the block
    succeeds, deletes it when the block raises (Ctrl-C included)."""
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
