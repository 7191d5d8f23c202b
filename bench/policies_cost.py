"""What configured scan policies cost in no-op throughput and pickup (issue 17).

Two arms (or three, ``--arms``), ROUNDS times each and interleaved (plain, policies,
policies, plain, …), on PostgreSQL + Redis, each in a fresh database with a fresh worker at
``--autoscale=2,2`` running the no-op runner (embedded bridge, warmed up):

- ``plain``: the four contract columns only, no limits; ``SCANQUEUE_MAX_RETRIES=0``.
- ``no_limit`` (``--arms``): the rows of ``policies``, without the limits.
- ``policies``: every row has a priority (0, 5, 10 or 100, at random) and one of
  20 ``scan_key`` values; ``SCANQUEUE_MAX_RUNNING_PER_KEY=2`` with a
  ``scanqueue limits set acct-00 1`` override; ``SCANQUEUE_MAX_RETRIES=0``.

Each run: PICKUP rows one at a time at idle (50–300 ms apart, each after the previous
one finished; ``started_at − created_at``), then N rows in one INSERT, throughput
= N / (last ``finished_at`` − ``created_at``), and the worker tree's CPU per scan.
Prints each run, then the medians with min–max and policies / plain.

``--claim-cost`` measures the claim alone instead, in process, on PostgreSQL and
SQLite: wall ms (median, p95 of ``--reps``) of ``Store.claim_within_window(100,
1000)`` at each backlog size (``--sizes``; priorities 0/10/20/30, one ``INSERT …
SELECT``, claimed rows released again after each claim), and this process's CPU
per claim.  Rows over 50 keys: without limits, with a per-key limit of 5, both
again at a window of 4 (limit 2: the policies arm's), and with every key full
(limit 1, one scan of each key dispatched: nothing to claim).  A key per scan (limit 1), then
with 2,000 rows of one full key of priority 100 ahead of them.  Writes
``bench/results/claim_cost.json``.

``--tree LABEL=DIR`` (repeatable) runs every arm from each source tree (e.g. a ``git
archive`` of an older commit), interleaved, as ``ARM@LABEL``: a before/after in
one run; each tree's arms are also given over its own ``plain``.

    .venv/bin/python -m bench.policies_cost                      # 3 rounds, 3,000 scans
    .venv/bin/python -m bench.policies_cost --arms plain,policies --tree new=. --tree old=/tmp/old
    .venv/bin/python -m bench.policies_cost --rounds 4 --n 3000 --pickup 40
    .venv/bin/python -m bench.policies_cost --claim-cost [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import (
    BIN,
    Db,
    Proc,
    RedisServer,
    create_pg_database,
    drop_pg_database,
    loadavg,
    pct,
    summary_ms,
    tree_cpu_s,
    upgrade,
    wait_for,
)
from bench.run import NOOP_RUNNER, Bench, Sizes, exactly_once, start_scanqueue

RESULTS = Path(__file__).resolve().parent / "results" / "policies_cost.json"
CLAIM_RESULTS = Path(__file__).resolve().parent / "results" / "claim_cost.json"
CLAIM_KEYS = 50
KEYS = [f"acct-{i:02d}" for i in range(20)]
PRIORITIES = (0, 5, 10, 100)
# Any: start_scanqueue's keyword arguments besides the environment are not str
POLICY_ENV: dict[str, Any] = {"SCANQUEUE_MAX_RUNNING_PER_KEY": "2", "SCANQUEUE_MAX_RETRIES": "0"}
PLAIN_ENV: dict[str, Any] = {"SCANQUEUE_MAX_RETRIES": "0"}


def insert_rows(db: Db, ids: list[str], policies: bool) -> None:
    """One statement; with policies each row names a priority and a key."""
    with db.conn() as c:
        cur = c.cursor()
        if policies:
            cur.execute(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " priority, scan_key) SELECT i, 'queued', '[\"aws\"]', '[\"soc2\"]', p, k"
                " FROM unnest(%s::text[], %s::int[], %s::text[]) AS t(i, p, k)",
                (
                    ids,
                    [random.choice(PRIORITIES) for _ in ids],
                    [random.choice(KEYS) for _ in ids],
                ),
            )
        else:
            cur.execute(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                " SELECT unnest(%s::text[]), 'queued', '[\"aws\"]', '[\"soc2\"]'",
                (ids,),
            )
        cur.close()


def check_alive(proc: Proc) -> None:
    if not proc.alive():
        raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")


def pickup(db: Db, proc: Proc, n: int, policies: bool) -> dict[str, Any]:
    prefix = f"pk-{uuid.uuid4().hex[:6]}-"
    for i in range(n):
        scan_id = f"{prefix}{i:04d}"
        time.sleep(random.uniform(0.05, 0.3))
        insert_rows(db, [scan_id], policies)

        def finished(scan_id: str = scan_id) -> bool:
            check_alive(proc)
            return db.count_unfinished(scan_id) == 0

        wait_for(finished, 60, interval=0.01, what=f"pickup of {scan_id}")
    rows = db.lifecycle(prefix)
    out = summary_ms([r["pickup_s"] for r in rows if r["pickup_s"] is not None])
    split = db.dispatch_split(prefix)
    out["created_to_claimed_p50_ms"] = summary_ms([a for a, _ in split]).get("p50_ms")
    out["claimed_to_started_p50_ms"] = summary_ms([c for _, c in split]).get("p50_ms")
    out["exactly_once"] = exactly_once(rows, n)["ok"]
    return out


def throughput(db: Db, proc: Proc, n: int, policies: bool) -> dict[str, Any]:
    prefix = f"tp-{uuid.uuid4().hex[:6]}-"
    cpu0 = tree_cpu_s(proc.pid)
    insert_rows(db, [f"{prefix}{i:06d}" for i in range(n)], policies)

    def done() -> bool:
        check_alive(proc)
        return db.count_unfinished(prefix) == 0

    wait_for(done, n / 20.0, interval=0.25, what=f"{n} scans")
    cpu_ms = (tree_cpu_s(proc.pid) - cpu0) * 1000.0 / n
    rows = db.lifecycle(prefix)
    created = min(r["created"] for r in rows)
    last = max(r["finished"] for r in rows)
    return {
        "per_s": round(n / (last - created), 1),
        "cpu_ms_per_scan": round(cpu_ms, 3),
        "exactly_once": exactly_once(rows, n)["ok"],
    }


def one_run(b: Bench, label: str, n: int, n_pickup: int, source: str = "") -> dict[str, Any]:
    arm = label.split("@", 1)[0]
    policies = arm != "plain"  # the rows carry priorities and keys
    limited = arm == "policies"
    db = b.new_db("postgresql")
    try:
        env = b.env(db)
        if limited:
            subprocess.run(
                [str(BIN / "scanqueue"), "limits", "set", "acct-00", "1"],
                env=env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        extra = {"PYTHONPATH": source} if source else {}
        worker = start_scanqueue(
            b, db, "2,2", runner=NOOP_RUNNER, **(POLICY_ENV if limited else PLAIN_ENV), **extra
        )
        load = loadavg()
        pk = pickup(db, worker, n_pickup, policies)
        tp = throughput(db, worker, n, policies)
        b.stop(worker)
    finally:
        b.drop_db(db)
    return {"arm": label, "pickup": pk, "throughput": tp, "load_before": load}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def fill_backlog(store: Any, n: int, keys: str, prefix: str = "b", priority: str = "") -> None:
    """``n`` queued rows already taken in, in one statement; ``keys`` and ``priority``
    are SQL expressions of the row number ``i``."""
    from sqlalchemy import text

    rows = (
        f"generate_series(0, {n - 1}) AS g(i)"
        if store.dialect == "postgresql"
        else f"(WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < {n - 1})"
        " SELECT i FROM g)"
    )
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority,"
                f" scan_key, effective_key, seen_at) SELECT '{prefix}' || i, 'queued',"
                f" '[\"aws\"]', '[]', {priority or '(i % 4) * 10'}, {keys}, {keys},"
                f" '2020-01-01 00:00:00' FROM {rows}"
            )
        )
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE scans")
            )


def timed_claims(
    store: Any, reps: int, key_limit: int, release: bool, window: int = 1000
) -> dict[str, Any]:
    """Wall ms of ``claim_within_window(100, window)`` (released again after each), and
    this process's CPU ms per claim."""
    samples: list[float] = []
    cpu = 0.0
    claimed = 0
    for i in range(reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        ids, _ = store.claim_within_window(100, window, key_limit=key_limit)
        if i:  # the first call connects and prepares
            samples.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
        claimed = len(ids)
        if release:
            store.release_dispatch(ids)
    ms = [v * 1000.0 for v in samples]
    return {
        "median_ms": round(pct(ms, 50) or 0.0, 2),
        "p95_ms": round(pct(ms, 95) or 0.0, 2),
        "cpu_ms": round(cpu * 1000.0 / max(1, reps), 2),
        "claimed": claimed,
    }


def shared_keys(store: Any, n: int, reps: int) -> dict[str, Any]:
    """CLAIM_KEYS keys: without limits, with a limit of 5, with every key full."""
    fill_backlog(store, n, f"'acct-' || (i % {CLAIM_KEYS})")
    res = {
        "no limit": timed_claims(store, reps, 0, True),
        "limit 5": timed_claims(store, reps, 5, True),
        "window 4, no limit": timed_claims(store, reps, 0, True, window=4),
        "window 4, limit 2": timed_claims(store, reps, 2, True, window=4),
    }
    held, _ = store.claim_within_window(100, 1000, key_limit=1)  # one of each key
    res["every key full"] = timed_claims(store, reps, 1, False)
    store.release_dispatch(held)
    return res


def own_keys(store: Any, n: int, reps: int) -> dict[str, Any]:
    """A key per scan (limit 1); then a full key's 2,000 rows ahead of them all."""
    fill_backlog(store, n, "'own-' || i")
    res = {"a key per scan": timed_claims(store, reps, 1, True)}
    fill_backlog(store, 2000, "'hot'", prefix="h", priority="100")
    held, _ = store.claim_within_window(1, 1000, key_limit=1)
    res["a full key's 2,000 rows ahead"] = timed_claims(store, reps, 1, True)
    store.release_dispatch(held)
    return res


def claim_cost(backends: list[str], sizes: list[int], reps: int) -> int:
    import shutil

    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import Store

    results: list[dict[str, Any]] = []
    for backend in backends:
        for n in sizes:
            for shape in (shared_keys, own_keys):
                tmp = Path(tempfile.mkdtemp(prefix="scanqueue-claim-cost-"))
                pg = backend == "postgresql"
                url = create_pg_database() if pg else f"sqlite:///{tmp}/scans.db"
                try:
                    upgrade(url)
                    store = Store(normalize_database_url(url))
                    try:
                        row = {"backend": backend, "queued": n, **shape(store, n, reps)}
                    finally:
                        store.dispose()
                finally:
                    if pg:
                        drop_pg_database(url)
                    shutil.rmtree(tmp, ignore_errors=True)
                results.append(row)
                print(
                    f"{backend} {n:>8} queued: "
                    + ", ".join(
                        f"{k} {v['median_ms']} ms (p95 {v['p95_ms']}, CPU {v['cpu_ms']},"
                        f" {v['claimed']} claimed)"
                        for k, v in row.items()
                        if isinstance(v, dict)
                    ),
                    flush=True,
                )
    CLAIM_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    CLAIM_RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.policies_cost", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--pickup", type=int, default=40)
    p.add_argument(
        "--arms",
        default="plain,policies",
        help="comma-separated from plain, policies, no_limit (priorities and keys, no limit)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tree", action="append", default=[], help="LABEL=DIR (repeatable)")
    p.add_argument("--claim-cost", action="store_true", help="time the claim alone instead")
    p.add_argument("--sizes", default="100000,1000000", help="--claim-cost: queued rows")
    p.add_argument("--backends", default="postgresql,sqlite", help="--claim-cost: databases")
    p.add_argument("--reps", type=int, default=50, help="--claim-cost: claims timed per case")
    args = p.parse_args(argv)
    if args.claim_cost:
        return claim_cost(
            args.backends.split(","), [int(n) for n in args.sizes.split(",")], args.reps
        )
    kinds = [a for a in args.arms.split(",") if a]
    assert set(kinds) <= {"plain", "policies", "no_limit"}, args.arms
    trees = [t.split("=", 1) for t in args.tree] or [["", ""]]
    sources = {f"{kind}@{label}" if label else kind: src for label, src in trees for kind in kinds}
    arms = list(sources)
    tmp = Path(tempfile.mkdtemp(prefix="scanqueue-bench-"))
    b = Bench(Sizes.for_mode(True), tmp)
    runs: list[dict[str, Any]] = []
    try:
        b.redis = RedisServer(tmp)
        b.redis.start()
        for i in range(args.rounds):
            order = arms if i % 2 == 0 else list(reversed(arms))
            for arm in order:
                r = one_run(b, arm, args.n, args.pickup, sources[arm])
                runs.append(r)
                print(
                    f"round {i + 1} {arm}: {r['throughput']['per_s']}/s,"
                    f" {r['throughput']['cpu_ms_per_scan']} ms CPU/scan,"
                    f" pickup p50 {r['pickup']['p50_ms']} ms p99 {r['pickup']['p99_ms']} ms"
                    f" (claim p50 {r['pickup']['created_to_claimed_p50_ms']} ms),"
                    f" load {r['load_before'][0]}",
                    flush=True,
                )
    finally:
        b.cleanup()
    summary: dict[str, Any] = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {
            "per_s": spread([r["throughput"]["per_s"] for r in mine]),
            "cpu_ms_per_scan": spread([r["throughput"]["cpu_ms_per_scan"] for r in mine]),
            "pickup_p50_ms": spread([r["pickup"]["p50_ms"] for r in mine]),
            "pickup_p99_ms": spread([r["pickup"]["p99_ms"] for r in mine]),
            "created_to_claimed_p50_ms": spread(
                [r["pickup"]["created_to_claimed_p50_ms"] for r in mine]
            ),
        }
    for arm in arms:
        kind, _, label = arm.partition("@")
        plain = f"plain@{label}" if label else "plain"
        if kind != "plain" and plain in summary:
            summary[f"{arm}_over_plain"] = {
                k: round(summary[arm][k]["median"] / summary[plain][k]["median"], 3)
                for k in ("per_s", "cpu_ms_per_scan", "pickup_p50_ms", "pickup_p99_ms")
            }
    ok = all(r["throughput"]["exactly_once"] and r["pickup"]["exactly_once"] for r in runs)
    out = {
        "n": args.n,
        "pickup_n": args.pickup,
        "runs": runs,
        "summary": summary,
        "exactly_once": ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({"summary": summary, "exactly_once": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
