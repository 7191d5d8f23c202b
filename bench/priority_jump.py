"""How long a high-priority scan waits behind a backlog, per dispatch window (issue 17).

A worker at ``--autoscale=2,2`` (embedded bridge) runs the stub runner with
``SCANQUEUE_STUB_SECONDS`` (default 1 s) through a backlog of 10,000 priority-0 rows
inserted in one statement.  Once the backlog moves, REPS scans of priority 100 are
inserted one at a time, each at a random phase of the running scans (a random
0–1 run's sleep after the previous one started, plus one run), with a plain SQL
``INSERT``.  The figure is ``started_at − created_at`` on the database clock, also
split into created → claimed (``dispatched_at``) and claimed → started, and given in
turnovers (the start delay divided by one scan's run time).  This is repeated for each
``SCANQUEUE_DISPATCH_WINDOW`` asked for (``default`` = unset: twice the slots, at
least 4).  Every process and database it starts is removed at the end, also on
failure or Ctrl-C.

    .venv/bin/python -m bench.priority_jump                            # PostgreSQL + Redis
    .venv/bin/python -m bench.priority_jump --backend sqlite
    .venv/bin/python -m bench.priority_jump --windows default,2,1 --reps 6 --backlog 10000
    .venv/bin/python -m bench.priority_jump --skip-jump --noop 3000   # the window's cost

``--noop N`` also measures what each window costs: N no-op scans in one INSERT
through a fresh worker of the same shape, ``--noop-rounds`` times, interleaved.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import Db, RedisServer, loadavg, wait_for
from bench.run import NOOP_RUNNER, Bench, Sizes, db_throughput, start_scanqueue

RESULTS = Path(__file__).resolve().parent / "results" / "priority_jump.json"


def insert_backlog(db: Db, ids: list[str]) -> None:
    db.insert_queued_bulk(ids)


def insert_urgent(db: Db, scan_id: str, priority: int) -> None:
    db.execute(
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority)"
        f" VALUES ({db.ph}, 'queued', '[\"aws\"]', '[\"soc2\"]', {db.ph})",
        (scan_id, priority),
    )


def started(db: Db, scan_id: str) -> bool:
    rows = db.execute(f"SELECT started_at FROM scans WHERE id = {db.ph}", (scan_id,))
    return bool(rows and rows[0][0] is not None)


def completed_count(db: Db, prefix: str) -> int:
    rows = db.execute(
        f"SELECT count(*) FROM scans WHERE id LIKE {db.ph} AND status = 'completed'",
        (prefix + "%",),
    )
    return int(rows[0][0])


def legs(db: Db, prefix: str) -> dict[str, tuple[float, float]]:
    """Per row: (created → claimed by the bridge, claimed → started), database clock."""
    if db.is_pg:
        sql = (
            "SELECT id, EXTRACT(EPOCH FROM (dispatched_at - created_at)),"
            " EXTRACT(EPOCH FROM (started_at - dispatched_at)) FROM scans WHERE id LIKE %s"
        )
    else:
        sql = (
            "SELECT id, (julianday(dispatched_at) - julianday(created_at)) * 86400.0,"
            " (julianday(started_at) - julianday(dispatched_at)) * 86400.0"
            " FROM scans WHERE id LIKE ?"
        )
    return {r[0]: (float(r[1]), float(r[2])) for r in db.execute(sql, (prefix + "%",))}


def backlog_rate(db: Db, prefix: str, t0: float, t1: float) -> float:
    """Backlog scans finished per second between ``t0`` and ``t1`` (epoch seconds)."""
    finished = [r["finished"] for r in db.lifecycle(prefix) if r["finished"] is not None]
    return sum(1 for f in finished if t0 <= f <= t1) / max(t1 - t0, 1e-9)


def one_window(
    b: Bench, backend: str, window: str, reps: int, backlog: int, run_s: float
) -> dict[str, Any]:
    db = b.new_db(backend)
    extra: dict[str, Any] = {"SCANQUEUE_STUB_SECONDS": str(run_s)}
    if window != "default":
        extra["SCANQUEUE_DISPATCH_WINDOW"] = window
    worker = start_scanqueue(b, db, "2,2", runner=None, warm=2, **extra)
    try:
        tag = uuid.uuid4().hex[:6]
        insert_backlog(db, [f"bl-{tag}-{i:05d}" for i in range(backlog)])
        wait_for(
            lambda: completed_count(db, f"bl-{tag}-") >= 4,
            60 + 10 * run_s,
            interval=0.1,
            what="the backlog moving",
        )
        urgent: list[str] = []
        for i in range(reps):
            time.sleep(run_s + random.uniform(0.0, run_s))  # a random phase of the slots
            scan_id = f"urgent-{tag}-{i:02d}"
            insert_urgent(db, scan_id, 100)
            urgent.append(scan_id)

            def up(scan_id: str = scan_id) -> bool:
                if not worker.alive():
                    raise RuntimeError(f"worker exited:\n{worker.output()[-3000:]}")
                return started(db, scan_id)

            wait_for(up, 30 + 10 * run_s, interval=0.02, what=f"{scan_id} started")
        rows = {r["id"]: r for r in db.lifecycle(f"urgent-{tag}-")}
        split = legs(db, f"urgent-{tag}-")
        delays = [float(rows[s]["pickup_s"]) for s in urgent]
        done_backlog = completed_count(db, f"bl-{tag}-")
        rate = backlog_rate(
            db, f"bl-{tag}-", rows[urgent[0]]["created"], rows[urgent[-1]]["started"]
        )
    finally:
        db.execute("UPDATE scans SET status = 'canceled' WHERE status = 'queued'")
        b.stop(worker)
        b.drop_db(db)
    return {
        "window": window,
        "reps": reps,
        "start_delay_s": [round(d, 3) for d in delays],
        "median_s": round(statistics.median(delays), 3),
        "max_s": round(max(delays), 3),
        "median_turnovers": round(statistics.median(delays) / run_s, 2),
        "max_turnovers": round(max(delays) / run_s, 2),
        "created_to_claimed_s": [round(split[s][0], 3) for s in urgent],
        "claimed_to_started_s": [round(split[s][1], 3) for s in urgent],
        "backlog_completed": done_backlog,
        # backlog scans finished per second while the urgent ones were measured
        # (2 slots of run_s: at most 2 / run_s)
        "backlog_per_s": round(rate, 3),
        "load_after": loadavg(),
    }


def noop_throughput(b: Bench, backend: str, window: str, n: int) -> float:
    """No-op scans/s through the same worker shape with this window (a fresh database)."""
    db = b.new_db(backend)
    extra: dict[str, Any] = {}
    if window != "default":
        extra["SCANQUEUE_DISPATCH_WINDOW"] = window
    try:
        worker = start_scanqueue(b, db, "2,2", runner=NOOP_RUNNER, **extra)
        run = db_throughput(db, n, worker, timeout_s=n / 10.0)
        b.stop(worker)
    finally:
        b.drop_db(db)
    assert run["exactly_once"]["ok"], run["exactly_once"]
    return float(run["per_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.priority_jump", description=__doc__)
    p.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    p.add_argument("--windows", default="default,2,1", help="comma-separated; default = unset")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--backlog", type=int, default=10_000)
    p.add_argument("--run-seconds", type=float, default=1.0)
    p.add_argument(
        "--noop",
        type=int,
        default=0,
        metavar="N",
        help="also: N no-op scans/s per window, --noop-rounds times interleaved (0: skip)",
    )
    p.add_argument("--noop-rounds", type=int, default=2)
    p.add_argument("--skip-jump", action="store_true", help="only the --noop throughput")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-bench-"))
    b = Bench(Sizes.for_mode(True), tmp)
    out: dict[str, Any] = {
        "backend": args.backend,
        "slots": 2,
        "run_seconds": args.run_seconds,
        "backlog": args.backlog,
        "windows": [],
    }
    try:
        if args.backend == "postgresql":
            b.redis = RedisServer(tmp)
            b.redis.start()
        for window in [] if args.skip_jump else windows:
            res = one_window(b, args.backend, window, args.reps, args.backlog, args.run_seconds)
            out["windows"].append(res)
            print(
                f"{args.backend} window={window}: median {res['median_s']} s"
                f" ({res['median_turnovers']} turnovers), max {res['max_s']} s,"
                f" backlog {res['backlog_per_s']}/s;"
                f" each {res['start_delay_s']}",
                flush=True,
            )
        if args.noop:
            noop: dict[str, list[float]] = {w: [] for w in windows}
            for i in range(args.noop_rounds):
                for window in windows if i % 2 == 0 else list(reversed(windows)):
                    noop[window].append(noop_throughput(b, args.backend, window, args.noop))
                    print(f"no-op window={window}: {noop[window][-1]}/s", flush=True)
            out["noop_per_s"] = noop
    finally:
        b.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    name = f"{args.out.stem}-{args.backend}{'-noop' if args.skip_jump else ''}.json"
    args.out.with_name(name).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
