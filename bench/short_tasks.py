"""How Celery's prefork pool runs short tasks at concurrency 2 (the no-op throughput bound).

Raw Celery (bench/raw_celery_app.py, scanqueue's reliable settings, Redis) runs
1,500 tasks that sleep 0, 2, 4 and 8 ms.  For each it prints the throughput and
how many tasks ran at once on average (task time summed over the run's span):
with prefetch 1 the worker's main process hands a pool process its next message
only after acking the last one, so short tasks barely overlap.  A scanqueue
"no-op" scan is not 0 ms but about 3.5–4 ms in the pool process (two durable
commits and the run's bookkeeping), so the 4 ms row is its like-for-like
yardstick.

    .venv/bin/python -m bench.short_tasks
"""

from __future__ import annotations

from bench.run import RawCelery, bench_with_redis


def main() -> None:
    b = bench_with_redis(quick=True)
    try:
        print("task ms | tasks/s | tasks running at once (of 2)")
        for seconds in (0.0, 0.002, 0.004, 0.008):
            raw = RawCelery(b, "postgresql", "2,2")
            if seconds:
                run = raw.throughput(1500, 300, "bench.sleep", seconds)
            else:
                run = raw.throughput(1500, 300)
            records = [r for r in raw.records() if r[0] >= 0]
            span = max(r[3] for r in records) - min(r[2] for r in records)
            at_once = sum(r[3] - r[2] for r in records) / span
            print(f"{seconds * 1000:7.0f} | {run['per_s']:7.1f} | {at_once:.2f}")
            b.stop(raw.proc)
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
