"""Shrinks on a real billiard pool, run in a fresh interpreter by tests/test_autoscale.py.

A pool forked from the test process would inherit its threads' locks (logging,
event senders of earlier tests) and could hang in its exit path; a clean
process has none.  Prints one JSON object (what was observed), then ends its
pool processes with SIGKILL and leaves with ``os._exit``: the plain billiard
pool's idle processes share one queue lock, so its own ``terminate()`` can wait
for ever on it (Celery's AsynPool gives each process its own queues).

    python -m tests.billiard_probe two_quick_shrinks | busy_process_kept
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from billiard.pool import Pool

from scanqueue.autoscale import shrink_idle_processes
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
    # Which processes each shrink told to end, read from the pool's own flags.  Not
    # whether they are gone yet: idle processes of the plain pool wait on one shared
    # queue lock, and one told to end while waiting leaves only once it gets it.
    def ending() -> set[int]:
        return {p.pid for p in pool._pool if getattr(p, "_controlled_termination", False)}

    first = shrink_idle_processes(pool, 1)
    after_first = ending()
    second = shrink_idle_processes(pool, 1)  # the first one is still in its exit path
    after_second = ending()
    return {
        "ended": [first, second],
        "told_to_end": len(after_second),
        "second_chose_another": len(after_second - after_first) == 1,
        "counted_after_two": pool._processes,
        "left_untold": len({p.pid for p in pool._pool} - after_second),
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


SCENARIOS: dict[str, tuple[Callable[[Any], dict[str, Any]], int]] = {
    "two_quick_shrinks": (two_quick_shrinks, 3),
    "busy_process_kept": (busy_process_kept, 2),
}


def main(scenario: str) -> None:
    run, processes = SCENARIOS[scenario]
    pool = Pool(processes)
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
