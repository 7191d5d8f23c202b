"""Per-step costs of scanqueue's hot path, in one process, against PostgreSQL + Redis.

    .venv/bin/python -m bench.micro [--n 300]

Where ``bench.run`` says *how fast*, this says *where the time goes*: wall and
CPU milliseconds per call of each step a scan takes (claim, publish, start_run,
observers, lease keeper, finish_run), and ``execute_scan`` end to end in
variants that each remove one cost — so every suggested change to scanqueue
comes with its measured gain.  The old pool's two plain psycopg2 statements are
the floor.  Writes ``bench/results/micro.json``; a cProfile of the shipped
variant goes to ``bench/results/micro-execute.prof``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Db, RedisServer, create_pg_database, drop_pg_database, loadavg, upgrade

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Claimed, unstarted rows kept ahead of each start: the default window at 2 slots.
WINDOW = 4


def timed(
    fn: Callable[[], Any],
    reps: int,
    finish: Callable[[], Any] | None = None,
    before_each: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Mean wall and CPU milliseconds per call of ``fn``.

    ``finish`` runs once inside the timing, after the calls: work they left to a
    background thread (queued events) is counted, not pushed into the next row.
    ``before_each`` runs before each call, outside the timing (setting up its row).
    """
    wall = cpu = 0.0
    if before_each is None:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            fn()
    else:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            w1, c1 = time.perf_counter(), time.process_time()
            wall, cpu = wall + w1 - w0, cpu + c1 - c0
            before_each()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
    if finish is not None:
        finish()
    w1, c1 = time.perf_counter(), time.process_time()
    wall, cpu = wall + w1 - w0, cpu + c1 - c0
    return {
        "wall_ms": round(wall * 1000 / reps, 3),
        "cpu_ms": round(cpu * 1000 / reps, 3),
        "reps": reps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scanqueue hot-path micro-benchmark")
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args(argv)
    n = args.n
    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-micro-"))
    redis_server = RedisServer(tmp)
    redis_server.start()
    url = create_pg_database()
    out: dict[str, Any] = {"load_start": loadavg(), "n": n}
    try:
        upgrade(url)
        os.environ.update(
            DATABASE_URL=url,
            REDIS_URL=redis_server.url,
            SCANQUEUE_QUEUE=f"sq-micro-{uuid.uuid4().hex[:6]}",
            SCANQUEUE_RUNNER="bench.runners:noop",
        )
        out.update(run_all(url, n))
    finally:
        with contextlib.suppress(Exception):
            from scanqueue.db.store import _stores

            for s in _stores.values():
                s.dispose()
        drop_pg_database(url)
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_end"] = loadavg()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "micro.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))
    return 0


def run_all(url: str, n: int) -> dict[str, Any]:
    import psycopg2

    from bench.harness import psycopg_dsn
    from scanqueue.db.engine import make_engine
    from scanqueue.db.store import Store
    from scanqueue.dispatch.publish import make_publisher
    from scanqueue.observe.event_sender import flush_pending_events
    from scanqueue.observe.observer import NULL_OBSERVER, RunInfo
    from scanqueue.runners.api import ScanContext, load_runner
    from scanqueue.worker.app import app, settings
    from scanqueue.worker.execute import ExecutionSettings, execute_scan
    from scanqueue.worker.lease import LeaseKeeper
    from scanqueue.worker.runtime import build_observer

    db = Db(url)
    dburl = settings.database_url
    store = Store(dburl)
    store.ping()
    runner = load_runner("bench.runners:noop")
    execution = ExecutionSettings(
        heartbeat_every_s=settings.heartbeat_every_s,
        lease_s=settings.lease_s,
        cancel_grace_s=settings.cancel_grace_s,
    )
    observer = build_observer(settings)
    res: dict[str, Any] = {}

    def queued(k: int) -> list[str]:
        ids = [f"m-{uuid.uuid4().hex[:10]}" for _ in range(k)]
        db.insert_queued_bulk(ids)
        return ids

    # Only a claimed row starts (a message is a start token), and the start reads the
    # claimed, unstarted rows: keep WINDOW of them claimed ahead of each start, as a
    # saturated bridge does, outside the timing.
    admin = psycopg2.connect(psycopg_dsn(url))
    admin.autocommit = True
    admin_cur = admin.cursor()

    def claim(scan_ids: list[str]) -> None:
        admin_cur.execute(
            "UPDATE scans SET dispatched_at = clock_timestamp(),"
            " dispatch_count = dispatch_count + 1 WHERE id = ANY(%s)",
            (scan_ids,),
        )

    def claiming_ahead(scan_ids: list[str]) -> Callable[[], None]:
        """A ``before_each`` that keeps WINDOW rows of ``scan_ids`` claimed, in order."""
        claim(scan_ids[:WINDOW])
        upcoming = iter(scan_ids[WINDOW:])

        def claim_next() -> None:
            following = next(upcoming, None)
            if following is not None:
                claim([following])

        first = [True]

        def before_each() -> None:
            # The first call's rows are claimed already; each later start freed one slot.
            if first[0]:
                first[0] = False
            else:
                claim_next()

        return before_each

    def flush_events() -> None:
        # Events are written by a background thread: wait for them inside the timing.
        if not flush_pending_events(60):
            raise RuntimeError("scan events not written within 60 s")

    # -- execute_scan end to end, variants --------------------------------------------------
    def run_variant(
        name: str, st: Store, obs: Any, profile: cProfile.Profile | None = None
    ) -> None:
        scan_ids = queued(n)
        ahead = claiming_ahead(scan_ids)
        ids = iter(scan_ids)
        with contextlib.ExitStack() as stack:
            if profile is not None:
                profile.enable()
                stack.callback(profile.disable)
            res[f"execute_scan[{name}]"] = timed(
                lambda: execute_scan(
                    next(ids), store=st, runner=runner, settings=execution, observer=obs
                ),
                n,
                finish=flush_events,
                before_each=ahead,
            )

    run_variant("warm-up", store, observer)
    run_variant("as shipped", store, observer)
    run_variant("no observers", store, NULL_OBSERVER)
    # A store on a given engine runs every statement through a pooled SQLAlchemy
    # Connection: what the held DB-API connections (scanqueue.db.direct_sql) save.
    via_sqlalchemy = Store(dburl, engine=make_engine(dburl))
    run_variant("no observers, SQLAlchemy Connection per statement", via_sqlalchemy, NULL_OBSERVER)
    run_variant("observers, SQLAlchemy Connection per statement", via_sqlalchemy, observer)

    # The old pool's two statements with psycopg2, autocommit: the floor.
    conn = psycopg2.connect(psycopg_dsn(url))
    conn.autocommit = True
    cur = conn.cursor()
    from bench.old_pool import PG_CLAIM, PG_FINISH

    queued(n)

    def old_pool_scan() -> None:
        cur.execute(PG_CLAIM, ("micro",))
        row = cur.fetchone()
        cur.execute(PG_FINISH, (row[0], row[1]))

    res["old_pool_scan[psycopg2 claim+finish]"] = timed(old_pool_scan, n)
    res["psycopg2 SELECT 1 (one round trip)"] = timed(lambda: cur.execute("SELECT 1"), n)
    conn.close()

    # -- the steps one by one ----------------------------------------------------------------
    scan_ids = queued(n)
    ahead = claiming_ahead(scan_ids)
    ids = iter(scan_ids)
    started: list[Any] = []
    res[f"Store.start_run ({WINDOW} claimed)"] = timed(
        lambda: started.append(store.start_run(next(ids), "m")), n, before_each=ahead
    )
    runs = iter(started)
    res["Store.finish_run"] = timed(
        lambda: store.finish_run(next(runs).scan_id, 1, "completed", findings_count=0), n
    )
    # A message of a lower priority than a claimed scan: it starts that one instead and
    # releases its own (each rep: a pair claimed, outside the timing).
    low_ids, high_ids = queued(n), queued(n)
    admin_cur.execute("UPDATE scans SET priority = 5 WHERE id = ANY(%s)", (high_ids,))
    pairs = iter(zip(low_ids, high_ids, strict=True))
    message: list[str] = []

    def claim_pair() -> None:
        low, high = next(pairs)
        claim([low, high])
        message[:] = [low]

    res["Store.start_run, a message that starts a higher priority"] = timed(
        lambda: store.start_run(message[0], "m"), n, before_each=claim_pair
    )
    # The released ones must not be claimed by the bridge's rows below.
    admin_cur.execute("UPDATE scans SET status = 'canceled' WHERE id = ANY(%s)", (low_ids,))
    hb_ids = queued(1)
    claim(hb_ids)
    hb = store.start_run(hb_ids[0], "m")
    assert hb is not None
    res["Store.heartbeat"] = timed(lambda: store.heartbeat(hb.scan_id, hb.attempt), n)
    res["Store.ping (SELECT 1 through the pool)"] = timed(store.ping, n)
    info = RunInfo(scan_id="x", attempt=1, providers=["aws"], frameworks=["soc2"])
    res["observers.started (events XADD + metrics)"] = timed(
        lambda: observer.started(info), n, finish=flush_events
    )

    def keeper_cycle() -> None:
        k = LeaseKeeper(store, ScanContext("x", 1, emit=lambda t, p: None), execution)
        k.start()
        k.stop()

    res["LeaseKeeper start+stop (a registration with the lease thread)"] = timed(keeper_cycle, n)

    # The bridge: claim batches, publish through one producer.
    queued(n)
    claimed: list[str] = []
    batches = max(1, n // 100)
    res["Store.claim_for_dispatch(100), per batch of 100"] = timed(
        lambda: claimed.extend(store.claim_for_dispatch(100)), batches
    )
    res["Store.claim_for_dispatch(100), empty queue"] = timed(
        lambda: store.claim_for_dispatch(100), 50
    )
    publish = make_publisher(app)
    res["publish, per message (batch of 100 via send_task)"] = {
        k: (round(v / 100, 3) if k != "reps" else v)
        for k, v in timed(lambda: publish(claimed[:100]), max(1, len(claimed) // 100)).items()
    }
    # A successor's message: one id per call (scanqueue/worker/successor.py).
    res["publish, one message per call (a successor's)"] = timed(lambda: publish(["x"]), n)
    with app.producer_or_acquire() as producer:
        res["app.send_task, one message"] = timed(
            lambda: app.send_task(
                "scanqueue.run_scan", args=("x",), producer=producer, queue=settings.queue
            ),
            n,
        )
    prof = cProfile.Profile()
    run_variant("as shipped, under cProfile (inflated)", store, observer, prof)
    admin.close()
    stats = pstats.Stats(prof)
    stats.dump_stats(str(RESULTS_DIR / "micro-execute.prof"))
    res["cprofile_execute_scan_top"] = top_cumulative(stats, n)
    return res


def top_cumulative(stats: pstats.Stats, n: int, limit: int = 30) -> list[dict[str, Any]]:
    """Functions by cumulative time per scan (ms), from the as-shipped variant."""
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(file.split("/")[-2:])
        rows.append(
            {
                "function": f"{fn} ({short}:{line})",
                "calls_per_scan": round(nc / n, 2),
                "cum_ms_per_scan": round(ct * 1000 / n, 3),
                "self_ms_per_scan": round(tt * 1000 / n, 3),
            }
        )
    rows.sort(key=lambda r: -r["cum_ms_per_scan"])
    return rows[:limit]


if __name__ == "__main__":
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    sys.exit(main())
