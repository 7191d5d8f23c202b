"""Shrinks on a real billiard blocking pool (the one Celery uses on the SQLite broker).

Run in a fresh interpreter by tests/e2e/test_autoscale.py.

A pool forked from the test process would inherit its threads' locks (logging,
event senders of earlier tests) and could hang in its exit path; a clean
process has none.  Prints one JSON object (what was observed), then ends its
pool processes with SIGKILL and leaves with ``os._exit``: the plain billiard
pool's idle processes share one queue lock, so its own ``terminate()`` can wait
for ever on it (Celery's AsynPool gives each process its own queues).

    python -m tests.billiard_probe two_quick_shrinks | busy_process_kept | repeated_shrinks
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from billiard.pool import Pool

from scanqueue.worker.autoscale import shrink_idle_processes
from tests.support import wait_for


def alive(pids: set[int]) -> set[int]:
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.add(pid)
        except OSError:
            continue
    return found


def two_quick_shrinks(pool: Any) -> dict[str, Any]:
    # The second shrink comes while the first process to leave is still in its exit
    # path: it must end another one, not count the same one twice.
    first_three = list(pool._pool)
    ended = [shrink_idle_processes(pool, 1), shrink_idle_processes(pool, 1)]
    counted = pool._processes
    pids = {p.pid for p in first_three}
    wait_for(lambda: len(alive(pids)) == 1, 15, what="two processes gone")
    wait_for(lambda: len(pool._pool) == 1, 15, what="pool joined them")
    time.sleep(1.5)  # nothing replaces them
    return {
        "ended": ended,
        "counted_after_two": counted,
        "exit_codes": sorted(p.exitcode for p in first_three if p.exitcode is not None),
        "left": len(alive(pids | {p.pid for p in pool._pool})),
        "still_runs_jobs": pool.apply_async(os.getpid).get(10) in alive(pids),
    }


def busy_process_kept(pool: Any) -> dict[str, Any]:
    result = pool.apply_async(time.sleep, (3,))
    wait_for(lambda: bool(result.worker_pids()), 15, what="job accepted")
    (busy,) = result.worker_pids()
    pids = {p.pid for p in pool._pool}
    ended = shrink_idle_processes(pool, 2)
    wait_for(lambda: len(alive(pids)) == 1, 15, what="idle one ended")
    still = busy in alive({busy})
    result.get(15)
    return {"ended": ended, "busy_alive": still, "job_finished": result.successful()}


def repeated_shrinks(pool: Any) -> dict[str, Any]:
    # Grow to 3 and shrink back to 1, CYCLES times, each within a bound: a process
    # told to end while waiting for the shared queue lock would stay (issue 4).
    cycles = int(os.environ.get("CYCLES", "5"))
    slowest = 0.0
    for _ in range(cycles):
        pool.grow(2)
        wait_for(lambda: len(alive({p.pid for p in pool._pool})) == 3, 15, what="grown to 3")
        t0 = time.monotonic()
        pids = {p.pid for p in pool._pool}
        shrink_idle_processes(pool, 1)
        shrink_idle_processes(pool, 1)
        wait_for(lambda: len(alive(pids)) == 1, 10, interval=0.05, what="back to 1")
        wait_for(lambda: len(pool._pool) == 1, 10, interval=0.05, what="pool joined them")
        slowest = max(slowest, time.monotonic() - t0)
    return {"cycles": cycles, "slowest_s": round(slowest, 2), "counted": pool._processes}


def start_a_thread() -> None:
    # Like a scanqueue pool process (lease thread, event sender): with a second
    # thread, a SIGTERM can land on that thread and not wake the main one out of
    # its wait for the queue lock, so a signalled idle process stays (issue 4).
    def tick() -> None:
        while True:
            time.sleep(0.001)

    threading.Thread(target=tick, daemon=True).start()


SCENARIOS: dict[str, tuple[Callable[[Any], dict[str, Any]], int]] = {
    "two_quick_shrinks": (two_quick_shrinks, 3),
    "busy_process_kept": (busy_process_kept, 2),
    "repeated_shrinks": (repeated_shrinks, 1),
}


def main(scenario: str) -> None:
    run, processes = SCENARIOS[scenario]
    pool = Pool(processes, initializer=start_a_thread)
    started = {p.pid for p in pool._pool}
    code = 1
    try:
        print(json.dumps(run(pool)), flush=True)
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        for pid in alive(started | {p.pid for p in pool._pool}):
            os.kill(pid, signal.SIGKILL)
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1])
