"""Outputs appear complete or not at all: written under a temporary sibling name, renamed at the end.

Every tool that writes a folder (converter, merges, classifier models, vocabulary extension) goes
through ``staged_output`` (or ``staged_outputs``, for the several folders of one merge), and every
file written whole (results, manifests, plans, records) through ``atomic_file`` or its
``write_text_atomic`` / ``write_json_atomic``, so an interrupted run never leaves an output that
looks finished. The temporary sibling is in the same folder, so the final rename is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is written before the rename: same folder (an atomic rename), hidden, and the
    same suffix (a writer that compresses by the name's suffix compresses the same way)."""
    return path.with_name(f".tmp-{os.getpid()}.{path.name}")


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yields the temporary sibling to write ``path`` into; renamed to ``path`` when the block
    succeeds, deleted when it raises (Ctrl-C included). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, obj, **dumps_options) -> Path:
    """``obj`` as indented JSON with a final newline (``dumps_options``: e.g. ensure_ascii=False)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, **dumps_options) + "\n")


def write_figure_atomic(path: str | Path, fig, dpi: int = 120) -> Path:
    """A matplotlib figure saved to ``path`` (format from its suffix, which the temporary name keeps),
    then closed: plotting tools draw one figure each and must not accumulate them."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


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
