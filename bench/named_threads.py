"""The no-op runner that also names its process's OS threads after their Python names.

For ``bench.thread_cpu`` only (``SCANQUEUE_RUNNER=bench.named_threads:noop``):
Python does not give its threads OS names, so in ``/proc`` every thread of a pool
process is ``celery``.  Every 200th run (and the first) writes each live thread's
name (first 15 characters) to ``/proc/self/task/<tid>/comm``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

from scanqueue import Job, ScanContext

_runs = itertools.count()


def _name_threads() -> None:
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None:
            continue
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm", "w") as comm:
            comm.write(thread.name[:15])


def noop(job: Job, ctx: ScanContext) -> None:
    if next(_runs) % 200 == 0:
        _name_threads()
    return None
