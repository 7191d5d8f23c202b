"""A backlog inserted in one statement: the broker holds at most the window (PostgreSQL + Redis).

    .venv/bin/python -m bench.backlog [--rows 100000] [--feed 3000] [--autoscale 4,4]

A standalone ``scanqueue bridge`` and one ``--without-bridge`` worker (so the
bridge's memory is its own process's).  Two runs on the same processes:

1. *no backlog*: a feeder keeps only a handful of rows queued (inserting 20
   whenever fewer than 20 wait undispatched) for ``--feed`` rows; the
   completion rate between 10 % and 90 % of them is the no-backlog throughput;
2. *backlog*: ``--rows`` rows in one ``INSERT … SELECT generate_series``; every
   0.25 s the broker's depth (Redis ``LLEN``), the rows dispatched but not
   started, the bridge's resident memory and the completions are sampled.  The
   drain rate is the completion rate between 10 % and 90 %.

Reports the most messages the broker held against the window (twice the
worker's slots, at least 4), the drain rate against the no-backlog throughput,
and the bridge's RSS at 10 % and 90 % of the drain.  Then, for reference, the
same backlog again through a bridge whose window is unbounded
(``SCANQUEUE_DISPATCH_WINDOW=1000000000``: the behaviour before the window,
where the broker holds the whole backlog).  Writes ``bench/results/backlog.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import BIN, RedisServer, vm_kib
from bench.run import NOOP_RUNNER, Bench, Sizes, start_standalone

RESULTS = Path(__file__).resolve().parent / "results" / "backlog.json"


def clear(db: Any) -> None:
    db.execute("DELETE FROM scans WHERE status = 'completed'")


def completed(db: Any, prefix: str) -> int:
    rows = db.execute(
        "SELECT count(*) FROM scans WHERE status = 'completed' AND left(id, 2) = %s", (prefix,)
    )
    return int(rows[0][0])


def rate_10_90(samples: list[tuple[float, int]], n: int) -> float | None:
    """Completions per second between the 10 % and the 90 % mark."""
    lo = next((t for t, c in samples if c >= n * 0.1), None)
    hi = next((t for t, c in samples if c >= n * 0.9), None)
    if lo is None or hi is None or hi <= lo:
        return None
    return (n * 0.8) / (hi - lo)


def no_backlog(db: Any, feed: int, timeout_s: float) -> dict[str, Any]:
    """Keep a handful queued; measure the completion rate."""
    stop = threading.Event()
    inserted = 0

    def feeder() -> None:
        nonlocal inserted
        deadline = time.monotonic() + timeout_s
        while inserted < feed and not stop.is_set() and time.monotonic() < deadline:
            waiting = db.execute(
                "SELECT count(*) FROM scans WHERE status = 'queued' AND dispatched_at IS NULL"
            )[0][0]
            if waiting < 20:
                chunk = min(20, feed - inserted)
                db.execute(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                    " SELECT 'nb' || (g + %s), 'queued', '[\"aws\"]', '[]'"
                    " FROM generate_series(1, %s) g",
                    (inserted, chunk),
                )
                inserted += chunk
            else:
                time.sleep(0.005)

    thread = threading.Thread(target=feeder)
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    thread.start()
    try:
        while time.monotonic() - t0 < timeout_s:
            done = completed(db, "nb")
            samples.append((time.monotonic(), done))
            if done >= feed:
                break
            time.sleep(0.25)
    finally:
        stop.set()
        thread.join(30)
    rate = rate_10_90(samples, feed)
    return {"rows": feed, "throughput_per_s": None if rate is None else round(rate, 1)}


def backlog(
    db: Any, redis_url: str, queue: str, bridge_pid: int, rows: int, window: int, timeout_s: float
) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    t_insert = time.monotonic()
    db.execute(
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
        " SELECT 'bl' || g, 'queued', '[\"aws\"]', '[]' FROM generate_series(1, %s) g",
        (rows,),
    )
    insert_s = time.monotonic() - t_insert
    samples: list[tuple[float, int]] = []
    rss: list[tuple[int, int | None]] = []
    most_broker = most_in_flight = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        most_broker = max(most_broker, int(client.llen(queue)))
        in_flight = db.execute(
            "SELECT count(*) FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL"
        )[0][0]
        most_in_flight = max(most_in_flight, int(in_flight))
        done = completed(db, "bl")
        samples.append((time.monotonic(), done))
        rss.append((done, vm_kib(bridge_pid, "VmRSS")))
        if done >= rows:
            break
        time.sleep(0.25)
    rate = rate_10_90(samples, rows)

    def rss_at(share: float) -> float | None:
        kib = next((k for d, k in rss if d >= rows * share and k is not None), None)
        return None if kib is None else round(kib / 1024, 1)

    return {
        "rows": rows,
        "insert_s": round(insert_s, 2),
        "finished": samples[-1][1] if samples else 0,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "window": window,
        "most_in_broker": most_broker,
        "most_dispatched_not_started": most_in_flight,
        "drain_per_s": None if rate is None else round(rate, 1),
        "bridge_rss_mib_at_10pct": rss_at(0.1),
        "bridge_rss_mib_at_90pct": rss_at(0.9),
        "bridge_rss_mib_max": round(max((k or 0) for _, k in rss) / 1024, 1) if rss else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--feed", type=int, default=3_000)
    parser.add_argument("--autoscale", default="4,4")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    slots = int(args.autoscale.split(",")[0])
    window = max(4, 2 * slots)
    with tempfile.TemporaryDirectory(prefix="sq-backlog-") as tmp:
        b = Bench(Sizes.for_mode(True), Path(tmp))
        try:
            b.redis = RedisServer(Path(tmp))
            b.redis.start()
            db = b.new_db("postgresql")
            bridge, _worker = start_standalone(b, db, args.autoscale)
            queue = bridge.env["SCANQUEUE_QUEUE"]
            res = {
                "autoscale": args.autoscale,
                "no_backlog": no_backlog(db, args.feed, args.timeout),
                "backlog": backlog(
                    db, b.redis.url, queue, bridge.pid, args.rows, window, args.timeout
                ),
            }
            clear(db)
            b.stop(bridge)
            env = b.env(
                db,
                SCANQUEUE_RUNNER=NOOP_RUNNER,
                SCANQUEUE_QUEUE=queue,
                SCANQUEUE_DISPATCH_WINDOW=str(10**9),
            )
            unbounded = b.start([str(BIN / "scanqueue"), "bridge"], env, "bridge-unbounded")
            unbounded.wait_for_output("bridge running", timeout=60)
            res["unbounded_window"] = backlog(
                db, b.redis.url, queue, unbounded.pid, args.rows, 10**9, args.timeout
            )
        finally:
            b.cleanup()
    base = res["no_backlog"]["throughput_per_s"]
    drain = res["backlog"]["drain_per_s"]
    res["drain_vs_no_backlog"] = None if not base or not drain else round(drain / base, 3)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
