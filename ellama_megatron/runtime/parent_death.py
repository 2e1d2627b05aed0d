"""Processes that die with their parent (Linux PR_SET_PDEATHSIG).

A killed launcher (kill -9 of recipes/cpt.py, of torchrun, a lost login shell) must not leave ranks
training and saving into a run folder that a relaunch then shares with them; nor may a killed rank
leave its checkpoint helpers (the spawned processes Megatron's saves report through) behind. The
kernel delivers the signal when the parent exits, however it exits. Elsewhere than Linux this does
nothing.

The kernel clears the parent-death signal of a forked child, and a forked child runs none of its
parent's module code that could arm it again: ``forked_children_die_with_parent`` arms it in the
children forked inside a block, right after the fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits; True when armed.

    SIGKILL by default: a rank whose launcher is gone cannot finish a save with the other ranks (they
    are dying too), so it must not try; the last complete checkpoint stays the one to resume from.
    If the parent is already gone (we were reparented before arming) the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)
    return True


_FORK_CHILDREN: dict = {}  # {"name": ...} while forked_children_die_with_parent is active
_AT_FORK_REGISTERED = False


def _arm_forked_child() -> None:
    if not _FORK_CHILDREN:
        return
    name = _FORK_CHILDREN.pop("name")  # the child's own forks are its own business
    die_with_parent()
    if name and sys.platform.startswith("linux"):
        # What ps, top and psutil call it (the command line stays the parent's).
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


@contextlib.contextmanager
def forked_children_die_with_parent(name: str | None = None):
    """Processes this one forks inside the block die with it (``die_with_parent`` armed in each
    child before it runs anything else), named ``name`` (at most 15 bytes) when given."""
    global _AT_FORK_REGISTERED
    if not _AT_FORK_REGISTERED:
        os.register_at_fork(after_in_child=_arm_forked_child)
        _AT_FORK_REGISTERED = True
    _FORK_CHILDREN["name"] = name
    try:
        yield
    finally:
        _FORK_CHILDREN.clear()
