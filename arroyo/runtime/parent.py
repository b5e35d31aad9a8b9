"""A stage process does not outlive the supervisor that started it.

When supervisord dies without stopping its children (SIGKILL, OOM killer, a crash),
its stages would go on under pid 1: holding their endpoints, invisible to ``arroyo
status``, joined by a second set at the next ``arroyo up``. On Linux the kernel can
signal a child when its parent exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread
watches the parent pid. Either way the stage gets SIGTERM and makes its usual clean
stop, so a chain whose supervisor died drains front to back and ends.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("arroyo.stage")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL = 1.0  # s, where there is no parent-death signal


def follow_parent(sig: int = signal.SIGTERM) -> bool:
    """Have ``sig`` sent to this process when its parent exits.

    Returns False when the parent is already gone: it died before this call (the
    process was reparented, to pid 1 or a subreaper), and no signal will ever come."""
    parent = os.getppid()
    if not _parent_death_signal(sig):
        threading.Thread(
            target=_watch, args=(parent, sig), daemon=True, name="arroyo-parent"
        ).start()
    # A parent that died before the signal was armed never triggers it: look again.
    return parent != 1 and os.getppid() == parent


def _parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            return True
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("no parent-death signal (%s); watching the parent instead", e)
    return False


def _watch(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os.kill(os.getpid(), sig)
