"""Is the PostgreSQL no-op throughput bound by commit latency?  An A/B in one window.

Alternates, ROUNDS times: raw Celery at concurrency 2 (the yardstick), scanqueue at
concurrency 2 on a database with ``synchronous_commit = on`` (as shipped), and the
same on a database with ``synchronous_commit = off`` (commits do not wait for the WAL
flush; scanqueue's statements are otherwise unchanged).  Each run is N no-op scans
through a warmed-up worker, as in ``bench.run``'s throughput phase.  It prints every
run and the median of each arm as a ratio against raw Celery.

    .venv/bin/python -m bench.commit_ab            # 3 rounds of 4,000
    BENCH_AB_ROUNDS=5 BENCH_AB_N=3000 .venv/bin/python -m bench.commit_ab
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

import psycopg2

from bench.harness import RedisServer, psycopg_dsn
from bench.run import Bench, RawCelery, Sizes, db_throughput, start_scanqueue


def set_synchronous_commit(url: str, value: str) -> None:
    dsn = psycopg_dsn(url)
    name = dsn.rsplit("/", 1)[-1]
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = {value}')
    conn.close()


def scanqueue_run(b: Bench, n: int, synchronous_commit: str) -> dict[str, float]:
    db = b.new_db("postgresql")
    try:
        set_synchronous_commit(db.url, synchronous_commit)
        worker = start_scanqueue(b, db, "2,2")
        run = db_throughput(db, n, worker, timeout_s=n / 20.0)
        b.stop(worker)
    finally:
        b.drop_db(db)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    return {"per_s": run["per_s"], "cpu_ms_per_scan": run["cpu_ms_per_scan"]}


def main() -> None:
    rounds = int(os.environ.get("BENCH_AB_ROUNDS", "3"))
    n = int(os.environ.get("BENCH_AB_N", "4000"))
    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-bench-"))
    b = Bench(Sizes.for_mode(False), tmp)
    b.redis = RedisServer(tmp)
    b.redis.start()
    runs: dict[str, list[float]] = {"raw": [], "on": [], "off": []}
    try:
        for i in range(rounds):
            raw = RawCelery(b, "postgresql", "2,2")
            runs["raw"].append(raw.throughput(n, n / 20.0)["per_s"])
            b.stop(raw.proc)
            for arm in ("on", "off") if i % 2 == 0 else ("off", "on"):
                runs[arm].append(scanqueue_run(b, n, arm)["per_s"])
            print(
                f"round {i + 1}: raw {runs['raw'][-1]}/s, synchronous_commit on "
                f"{runs['on'][-1]}/s, off {runs['off'][-1]}/s",
                flush=True,
            )
    finally:
        b.cleanup()
    med = {arm: statistics.median(v) for arm, v in runs.items()}
    print(
        json.dumps(
            {
                "n": n,
                "runs": runs,
                "median_per_s": med,
                "on_vs_raw": round(med["on"] / med["raw"], 3),
                "off_vs_raw": round(med["off"] / med["raw"], 3),
                "off_vs_on": round(med["off"] / med["on"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
