"""Who this process is: the incarnation id that run rows, worker rows and locks carry.

Shared by the worker (a run's ``worker_id``, its hand-back at shutdown) and the
bridge (its leadership token); it depends on nothing else in scanqueue.
"""

from __future__ import annotations

import os
import socket
import uuid

_identity: tuple[int, str] | None = None


def worker_identity() -> str:
    """This process's incarnation id: host, pid and a random part (hosts and pids repeat).

    A forked pool process extends its parent's id (``parent/pid:random``), so a
    worker can find the runs of its own pool when it shuts down.
    """
    global _identity
    pid = os.getpid()
    if _identity is None:
        _identity = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
    elif _identity[0] != pid:
        parent = _identity[1].split("/", 1)[0]
        _identity = (pid, f"{parent}/{pid}:{uuid.uuid4().hex[:4]}")
    return _identity[1]
