"""The no-op runner, timing where a pool process's wall time goes (``bench.pool_cycle``).

For ``bench.pool_cycle`` only: ``SCANQUEUE_RUNNER=bench.cycle_runners:noop`` with
``BENCH_CYCLE_DIR`` a directory.  Importing this module (the pool process does, when
it builds its runtime on its warm-up) wraps the store's start and finish, the
observers, the lease registration, the successor's message and the task's call of
``execute_scan`` in ``perf_counter`` timers.  Every 200 scans each pool process
writes its totals to ``BENCH_CYCLE_DIR/<pid>.json``: seconds inside ``execute_scan``
and its parts, and seconds between one ``execute_scan`` and the next (Celery's
hand-off, the wait for a message).  Never for production.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from scanqueue import Job, ScanContext
from scanqueue.db import runs
from scanqueue.observe import observer
from scanqueue.worker import execute, successor, task

OUT_DIR = os.environ.get("BENCH_CYCLE_DIR", "")
WRITE_EVERY = 200
totals: dict[str, float] = {
    "scans": 0,
    "execute": 0.0,
    "start_run": 0.0,
    "finish_run": 0.0,
    "observers": 0.0,
    "lease": 0.0,
    "successor_send": 0.0,
    "successor_answer": 0.0,
    "between": 0.0,
}
_last_exit: list[float] = []


def _timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    return timed


def _write() -> None:
    if OUT_DIR:
        path = os.path.join(OUT_DIR, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(totals, f)
        os.replace(path + ".tmp", path)


_execute_scan = task.execute_scan


def _timed_execute_scan(*args: Any, **kwargs: Any) -> Any:
    t0 = time.perf_counter()
    if _last_exit:
        totals["between"] += t0 - _last_exit[0]
    try:
        return _execute_scan(*args, **kwargs)
    finally:
        t1 = time.perf_counter()
        totals["execute"] += t1 - t0
        totals["scans"] += 1
        _last_exit[:] = [t1]
        if totals["scans"] % WRITE_EVERY == 0:
            _write()


runs.RunsMixin.start_run = _timed("start_run", runs.RunsMixin.start_run)  # type: ignore[method-assign]
runs.RunsMixin.finish_run = _timed("finish_run", runs.RunsMixin.finish_run)  # type: ignore[method-assign]
for _name in ("started", "event", "finished"):
    _method = getattr(observer.SafeObservers, _name)
    setattr(observer.SafeObservers, _name, _timed("observers", _method))
execute.LeaseKeeper.start = _timed("lease", execute.LeaseKeeper.start)  # type: ignore[method-assign]
execute.LeaseKeeper.stop = _timed("lease", execute.LeaseKeeper.stop)  # type: ignore[method-assign]
# The message's write before the run and the read of the broker's answer after it.
successor.Successors.send_early = _timed("successor_send", successor.Successors.send_early)  # type: ignore[method-assign]
successor.SentSuccessor.settle = _timed("successor_answer", successor.SentSuccessor.settle)  # type: ignore[method-assign]
task.execute_scan = _timed_execute_scan


def noop(job: Job, ctx: ScanContext) -> None:
    return None
