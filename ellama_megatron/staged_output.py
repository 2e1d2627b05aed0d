"""Outputs appear complete or not at all: written under a temporary sibling name, renamed at the end.

Every tool that writes a folder (converter, merge of classifier models, vocabulary extension) goes
through ``staged_output``, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def staged_output(out: Path):
    """Yields an empty temporary folder next to ``out``; renames it to ``out`` (replacing an old
    one) when the block succeeds, deletes it when the block raises (Ctrl-C included). Whether an
    existing ``out`` may be replaced is the caller's decision, checked before any work."""
    out = Path(out)
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
