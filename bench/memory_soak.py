"""Does a worker's memory stay flat over 10⁵ scans? (PostgreSQL + Redis, c2.)

Issue 18's memory target: the worker's processes (main + pool) after 10⁵ scans hold
within 10 % of their size after 10³.  One worker with its embedded bridge runs no-op
scans fed in chunks (never more than two chunks queued); the resident set (VmRSS, what
the processes hold now, not their peak) of the main process and of every pool
process is read after the first 10³ completions and again at the end.  The bridge's
own memory while a 10⁵-row backlog drains is ``bench.backlog``'s figure.

    .venv/bin/python -m bench.memory_soak [--scans 100000] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bench.harness import children_of, vm_kib
from bench.run import RESULTS_DIR, bench_with_redis, start_scanqueue

FIRST_SAMPLE_AT = 1000


def rss_mib(pid: int) -> dict[str, Any]:
    kids = children_of(pid)
    pool = [k for k in (vm_kib(k, "VmRSS") for k in kids) if k is not None]
    main = vm_kib(pid, "VmRSS") or 0
    return {
        "main_mib": round(main / 1024, 1),
        "pool_mib": [round(k / 1024, 1) for k in pool],
        "total_mib": round((main + sum(pool)) / 1024, 1),
    }


def finished(db: Any, prefix: str) -> int:
    rows = db.execute(
        f"SELECT count(*) FROM scans WHERE id LIKE {db.ph} AND status = 'completed'",
        (prefix + "%",),
    )
    return int(rows[0][0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=5_000)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    b = bench_with_redis()
    prefix = f"soak-{uuid.uuid4().hex[:6]}-"
    result: dict[str, Any] = {"scans": args.scans}
    try:
        db = b.new_db("postgresql")
        worker = start_scanqueue(b, db, "2,2")
        inserted = 0
        first: dict[str, Any] | None = None
        began = time.monotonic()
        deadline = began + args.timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.output()[-3000:]}")
            done = finished(db, prefix)
            if first is None and done >= FIRST_SAMPLE_AT:
                first = {"completed": done, **rss_mib(worker.pid)}
                print(f"after {done}: {first}", flush=True)
            if done >= args.scans:
                break
            if inserted < args.scans and inserted - done < 2 * args.chunk:
                size = min(args.chunk, args.scans - inserted)
                db.insert_queued_bulk([f"{prefix}{inserted + i:07d}" for i in range(size)])
                inserted += size
            time.sleep(0.5)
        else:
            raise RuntimeError(f"timed out after {args.timeout:.0f}s")
        last = {"completed": finished(db, prefix), **rss_mib(worker.pid)}
        print(f"after {last['completed']}: {last}", flush=True)
        attempts = db.execute(
            f"SELECT count(*) FROM scans WHERE id LIKE {db.ph} AND attempts <> 1",
            (prefix + "%",),
        )[0][0]
        assert first is not None
        result.update(
            {
                "seconds": round(time.monotonic() - began, 1),
                "after_1e3": first,
                "after_end": last,
                "total_ratio": round(last["total_mib"] / first["total_mib"], 3),
                "main_ratio": round(last["main_mib"] / first["main_mib"], 3),
                "exactly_once": attempts == 0,
            }
        )
        b.stop(worker)
    finally:
        b.cleanup()
    print(json.dumps(result, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "memory_soak.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
