"""What the hot reads cost as ``scans`` grows: 10**3 vs 10**6 finished rows (PostgreSQL).

    .venv/bin/python -m bench.large_table [--sizes 1000,1000000] [--reps 50]

For each size: a throwaway database migrated by ``scanqueue db upgrade``, that
many finished rows plus 100 queued ones (one ``INSERT … SELECT generate_series``),
``ANALYZE``, then wall milliseconds (median and p95 over ``--reps`` calls) of

* the unfiltered newest-first page (``Store.list_scans(limit=50)``: what
  ``scanqueue list`` and the console's poll read), and the same with
  ``status='queued'``;
* the queue-depth count (``Store.queue_depth()``: every bridge tick, every
  autoscaler sample, every ``/metrics`` scrape — now shared once per second per
  process, so this is the cost per interval, not per reader);
* a dispatch claim attempt while the window is full (the advisory lock and
  the in-flight count of ``Store.claim_within_window``).

At the largest size the page is measured again without ``scans_created_id_idx``
to show what the index buys.  Writes ``bench/results/large_table.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import create_pg_database, drop_pg_database, upgrade

RESULTS = Path(__file__).resolve().parent / "results" / "large_table.json"


def timed_ms(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    fn()  # warm: plan cache, connection
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 3),
    }


def fill(url: str, finished: int) -> float:
    import psycopg2

    t0 = time.monotonic()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, created_at,"
            " started_at, finished_at, attempts)"
            " SELECT 'f' || g, 'completed', '[\"aws\"]', '[\"soc2\"]',"
            " now() - make_interval(secs => g), now() - make_interval(secs => g),"
            " now() - make_interval(secs => g), 1 FROM generate_series(1, %s) g",
            (finished,),
        )
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
            " SELECT 'q' || g, 'queued', '[\"aws\"]', '[]' FROM generate_series(1, 100) g"
        )
        cur.execute("VACUUM ANALYZE scans")
    conn.close()
    return time.monotonic() - t0


def explain(url: str, sql: str) -> str:
    import psycopg2

    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("EXPLAIN " + sql)
        plan = " / ".join(r[0].strip() for r in cur.fetchall()[:3])
    conn.close()
    return plan


def measure(size: int, reps: int, without_index: bool) -> dict[str, Any]:
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import Store

    url = create_pg_database()
    try:
        upgrade(url)
        fill_s = fill(url, size)
        store = Store(normalize_database_url(url))
        try:
            res: dict[str, Any] = {"finished_rows": size, "fill_s": round(fill_s, 1)}
            res["list newest 50"] = timed_ms(lambda: store.list_scans(limit=50), reps)
            res["list newest 50, status=queued"] = timed_ms(
                lambda: store.list_scans(status="queued", limit=50), reps
            )
            res["queue_depth"] = timed_ms(store.queue_depth, reps)
            res["claim attempt, window full (lock + in-flight count)"] = timed_ms(
                lambda: store.claim_within_window(100, 0), reps
            )
            res["plan: list"] = explain(
                url, "SELECT id FROM scans ORDER BY created_at DESC, id DESC LIMIT 50"
            )
            res["plan: depth"] = explain(url, "SELECT count(*) FROM scans WHERE status='queued'")
            if without_index:
                with store.engine.begin() as conn:
                    from sqlalchemy import text

                    conn.execute(text("DROP INDEX scans_created_id_idx"))
                res["list newest 50, without scans_created_id_idx"] = timed_ms(
                    lambda: store.list_scans(limit=50), max(5, reps // 10)
                )
        finally:
            store.dispose()
        return res
    finally:
        drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,1000000")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [measure(n, args.reps, without_index=n == max(sizes)) for n in sizes]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"\n{r['finished_rows']:>9} finished rows (filled in {r['fill_s']} s)")
        for key, value in r.items():
            if isinstance(value, dict):
                print(
                    f"  {key:<50} median {value['median_ms']:8.3f} ms"
                    f"  p95 {value['p95_ms']:8.3f} ms"
                )
            elif key.startswith("plan"):
                print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
