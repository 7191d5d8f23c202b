"""Where a no-op scan's CPU goes, process by process (PostgreSQL, concurrency 2).

Runs N no-op scans through a warmed-up worker (as ``bench.run``'s throughput phase)
and reports CPU milliseconds per scan of the worker's main process (consumer and
embedded bridge), its pool processes, and PostgreSQL's and Redis's servers, with
the throughput.  An experiment for the bound analysis in ``bench/README.md``.

    .venv/bin/python -m bench.cpu_split             # 3 runs of 4,000
    BENCH_CPU_RUNS=5 BENCH_CPU_N=6000 .venv/bin/python -m bench.cpu_split
"""

from __future__ import annotations

import json
import os
import statistics

from bench.harness import CpuSplit, children_of, proc_cpu_s
from bench.run import Bench, bench_with_redis, db_throughput, start_scanqueue


def one_run(b: Bench, n: int) -> dict[str, float]:
    db = b.new_db("postgresql")
    try:
        worker = start_scanqueue(b, db, "2,2")
        pool = children_of(worker.pid)
        before = {"main": proc_cpu_s(worker.pid), "pool": sum(proc_cpu_s(p) for p in pool)}
        split = CpuSplit(worker.pid, None)
        run = db_throughput(db, n, worker, timeout_s=n / 20.0)
        after = {"main": proc_cpu_s(worker.pid), "pool": sum(proc_cpu_s(p) for p in pool)}
        servers = split.ms_per_item(n)
        b.stop(worker)
    finally:
        b.drop_db(db)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    out = {k: round((after[k] - before[k]) * 1000.0 / n, 3) for k in after}
    out.update(
        postgres=servers.get("postgres", 0.0),
        redis=servers.get("redis", 0.0),
        per_s=float(run["per_s"]),
    )
    return out


def main() -> None:
    runs = int(os.environ.get("BENCH_CPU_RUNS", "3"))
    n = int(os.environ.get("BENCH_CPU_N", "4000"))
    b = bench_with_redis()
    results = []
    try:
        for i in range(runs):
            results.append(one_run(b, n))
            print(f"run {i + 1}: {results[-1]}", flush=True)
    finally:
        b.cleanup()
    median = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(json.dumps({"n": n, "runs": results, "median": median}, indent=2))


if __name__ == "__main__":
    main()
