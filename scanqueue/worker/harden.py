"""Process hardening: keep a worker's secrets out of reach of the scanners it starts.

A ``sarif-command`` scanner runs as the worker's user.  Without more, it could
read ``/proc/<worker pid>/environ`` (``DATABASE_URL`` with its password, the
broker URL) or attach a debugger to the worker.  :func:`make_non_dumpable`
sets ``PR_SET_DUMPABLE`` to 0 on Linux: the kernel then owns the process's
``/proc/<pid>/`` files by root and refuses ``ptrace`` and ``environ``/``mem``
reads to every other process of the same user (root, with ``CAP_SYS_PTRACE``,
still can).  The flag survives ``fork`` (so the prefork pool inherits it from
the worker's main process) and is reset by ``execve`` (so a scanner is an
ordinary process).  Side effect: the process writes no core dump.

Running scanners as a different user remains the stronger separation; see
docs/real-runner.md.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    func.restype = ctypes.c_int
    return func


def make_non_dumpable() -> bool:
    """Make this process non-dumpable (Linux); True when it is so afterwards."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable (errno %d)", ctypes.get_errno())
        return False
    return True


def is_dumpable() -> bool | None:
    """This process's dumpable flag (None where it cannot be read)."""
    prctl = _prctl()
    if prctl is None:
        return None
    return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
