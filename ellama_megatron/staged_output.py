"""Outputs appear complete or not at all: written under a temporary sibling name, renamed at the end.

Every tool that writes a folder (converter, merges, classifier models, vocabulary extension) goes
through ``staged_output`` (or ``staged_outputs``, for the several folders of one merge), so an
interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def staged_outputs(outs: list[Path]):
    """Yields one empty temporary folder beside each of ``outs``; when the block succeeds renames
    each to its ``out`` (replacing an old one), when it raises (Ctrl-C included) deletes them all.
    Whether an existing ``out`` may be replaced is the caller's decision, checked before any work."""
    outs = [Path(o) for o in outs]
    tmps = [o.parent / f".{o.name}.partial-{os.getpid()}" for o in outs]
    try:
        for out, tmp in zip(outs, tmps):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        yield tmps
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for out, tmp in zip(outs, tmps):
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)


@contextlib.contextmanager
def staged_output(out: Path):
    """``staged_outputs`` for one folder: yields its temporary folder."""
    with staged_outputs([out]) as (tmp,):
        yield tmp
