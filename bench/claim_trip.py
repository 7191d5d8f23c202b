"""The claim's round trip as the embedded bridge sends it at pickup (PostgreSQL):
the lock, the prepared claim and the commit in one query string, one row inserted
before each claim (unseen, as another program writes it), 1,000 finished rows in
the table.  Arms, alternated claim by claim on one connection: the whole policy
statement, the plain one (no pause or limit), and the plain one committing as the
bridge does, without waiting for its WAL flush.

    .venv/bin/python -m bench.claim_trip [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import psycopg2

from bench.harness import create_pg_database, drop_pg_database, summary_ms, upgrade
from scanqueue.config import normalize_database_url
from scanqueue.db import claim_sql
from scanqueue.db.claims import DISPATCH_LOCK_KEY

ROW = "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
FLUSHED = ", set_config('synchronous_commit', 'off', true)"


def arms() -> dict[str, str]:
    whole = claim_sql.pg_one_trip_sql(DISPATCH_LOCK_KEY, prepared=True)
    plain = claim_sql.pg_one_trip_sql(DISPATCH_LOCK_KEY, prepared=True, plain=True)
    if FLUSHED not in whole or FLUSHED not in plain:
        raise SystemExit("claim_trip: the claim's commit setting is not where it was")
    return {
        "whole": whole.replace(FLUSHED, ""),
        "plain": plain.replace(FLUSHED, ""),
        "plain_unflushed": plain,
    }


def run(n: int) -> dict[str, Any]:
    url = create_pg_database()
    try:
        upgrade(url)
        dsn = normalize_database_url(url).replace("postgresql+psycopg2", "postgresql")
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(
            f"{ROW} SELECT 'done' || g, 'completed', '[\"aws\"]', '[\"soc2\"]'"
            " FROM generate_series(1, 1000) g"
        )
        for plain in (False, True):
            cur.execute(claim_sql.pg_prepare_sql(plain=plain))
        trips = arms()
        params = {"key_limit": 0, "limit": 4, "window": 4, "cap": 4, "m": claim_sql.fast_rows(4)}
        times: dict[str, list[float]] = {name: [] for name in trips}
        names = list(trips)
        for i in range(n):
            name = names[i % len(names)]
            scan_id = uuid.uuid4().hex
            cur.execute(f"{ROW} VALUES (%s, 'queued', '[\"aws\"]', '[\"soc2\"]')", (scan_id,))
            began = time.perf_counter()
            cur.execute(trips[name], params)
            rows = cur.fetchall()
            times[name].append(time.perf_counter() - began)
            claimed = [r[1] for r in rows if r[0] == "claimed"]
            assert claimed == [scan_id], rows
            cur.execute("UPDATE scans SET status = 'completed' WHERE id = %s", (scan_id,))
        conn.close()
        return {name: summary_ms(ts[len(ts) // 20 :]) for name, ts in times.items()}
    finally:
        drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    result = run(parser.parse_args().n)
    for name, summary in result.items():
        print(f"{name:16} p50 {summary['p50_ms']:.3f} ms  p99 {summary['p99_ms']:.3f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
