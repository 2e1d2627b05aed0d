"""Processes that die with their parent (Linux PR_SET_PDEATHSIG).

A killed launcher (kill -9 of recipes/cpt.py, of torchrun, a lost login shell) must not leave ranks
training and saving into a run folder that a relaunch then shares with them; nor may a killed rank
leave its checkpoint helpers (the spawned processes Megatron's saves report through) behind. The
kernel delivers the signal when the parent exits, however it exits. Elsewhere than Linux this does
nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
