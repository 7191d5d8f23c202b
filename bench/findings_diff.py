"""What computing a scan's diff against its baseline costs with a big history (PostgreSQL).

    .venv/bin/python -m bench.findings_diff [--other-scans 9900] [--per-scan 98] [--reps 5]

A throwaway database migrated by ``scanqueue db upgrade`` is filled (``INSERT …
SELECT generate_series``) with about 10**6 findings over 10**4 scans:

* ``--other-scans`` completed scans over 99 other keys, ``--per-scan``
  findings each (the same fingerprints recur across a key's scans, as real
  findings do);
* the measured key: 98 older completed scans (which between them saw 500
  fingerprints that come back), the baseline with 10,000 findings, and the
  running scan under test with 10,000 findings — 9,000 also in the baseline
  (``unchanged``), 500 seen only in the older scans (``reopened``), 500 never
  seen (``new``); the baseline's other 1,000 are ``fixed``.

Then ``ANALYZE`` and wall time of :meth:`RunnerStore.write_diff` (the fenced
transaction the runner runs before a scan completes: reset, states, fixed
rows, counts), median and max over ``--reps`` runs; each run recomputes from
scratch.  Writes ``bench/results/findings_diff.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import create_pg_database, drop_pg_database, upgrade

RESULTS = Path(__file__).resolve().parent / "results" / "findings_diff.json"
KEY = "hot|"
SCAN = "hc"
BASELINE = "hb"
FINDING_COLUMNS = "scan_id, check_id, provider, severity, resource, message, fingerprint, state"


def fill(url: str, other_scans: int, per_scan: int) -> dict[str, Any]:
    import psycopg2

    t0 = time.monotonic()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Other keys: completed scans, each with per_scan recurring findings.
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, effective_key,"
            " created_at, started_at, finished_at, attempts, findings_count)"
            " SELECT 'o' || g, 'completed', '[\"aws\"]', '[]', 'k' || mod(g, 99) || '|',"
            " now() - make_interval(secs => 100000 + g), now() - make_interval(secs => 100000 + g),"
            " now() - make_interval(secs => 99990 + g), 1, %s FROM generate_series(1, %s) g",
            (per_scan, other_scans),
        )
        cur.execute(
            f"INSERT INTO findings ({FINDING_COLUMNS})"
            " SELECT 'o' || s, 'CHK-' || i, 'aws', 'high', 'res-' || i, 'msg',"
            " md5('k' || mod(s, 99) || ':' || i), 'unchanged'"
            " FROM generate_series(1, %s) s, generate_series(1, %s) i",
            (other_scans, per_scan),
        )
        # The measured key: older scans (h1 saw the 500 that come back), the baseline,
        # the scan under test.
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, effective_key,"
            " created_at, started_at, finished_at, attempts)"
            " SELECT 'h' || g, 'completed', '[\"hot\"]', '[]', %s,"
            " now() - make_interval(secs => 5000 + g), now() - make_interval(secs => 5000 + g),"
            " now() - make_interval(secs => 4990 + g), 1 FROM generate_series(1, 98) g",
            (KEY,),
        )
        cur.execute(
            f"INSERT INTO findings ({FINDING_COLUMNS})"
            " SELECT 'h1', 'R', 'hot', 'low', 'r' || i, 'm', md5('r' || i), 'new'"
            " FROM generate_series(1, 500) i"
        )
        cur.execute(
            f"INSERT INTO findings ({FINDING_COLUMNS})"
            " SELECT 'h' || s, 'R', 'hot', 'low', 'r' || i, 'm', md5('r' || i), 'unchanged'"
            " FROM generate_series(2, 98) s, generate_series(1, 100) i"
        )
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, effective_key,"
            " created_at, started_at, finished_at, attempts)"
            " VALUES (%s, 'completed', '[\"hot\"]', '[]', %s, now() - interval '2 hours',"
            " now() - interval '2 hours', now() - interval '1 hour', 1),"
            " (%s, 'running', '[\"hot\"]', '[]', %s, now(), now(), NULL, 1)",
            (BASELINE, KEY, SCAN, KEY),
        )
        cur.execute(
            f"INSERT INTO findings ({FINDING_COLUMNS})"
            " SELECT %s, 'U', 'hot', 'high', 'u' || i, 'm', md5('u' || i), 'unchanged'"
            " FROM generate_series(1, 9000) i"
            " UNION ALL SELECT %s, 'X', 'hot', 'high', 'x' || i, 'm', md5('x' || i), 'new'"
            " FROM generate_series(1, 1000) i",
            (BASELINE, BASELINE),
        )
        cur.execute(
            f"INSERT INTO findings ({FINDING_COLUMNS})"
            " SELECT %s, 'U', 'hot', 'high', 'u' || i, 'm', md5('u' || i), NULL"
            " FROM generate_series(1, 9000) i"
            " UNION ALL SELECT %s, 'R', 'hot', 'low', 'r' || i, 'm', md5('r' || i), NULL"
            " FROM generate_series(1, 500) i"
            " UNION ALL SELECT %s, 'N', 'hot', 'low', 'n' || i, 'm', md5('n' || i), NULL"
            " FROM generate_series(1, 500) i",
            (SCAN, SCAN, SCAN),
        )
        cur.execute("VACUUM ANALYZE scans")
        cur.execute("VACUUM ANALYZE findings")
        cur.execute("SELECT count(*) FROM scans")
        scans = cur.fetchone()[0]  # type: ignore[index]
        cur.execute("SELECT count(*) FROM findings")
        findings = cur.fetchone()[0]  # type: ignore[index]
    conn.close()
    return {"scans": scans, "findings": findings, "fill_s": round(time.monotonic() - t0, 1)}


def measure(other_scans: int, per_scan: int, reps: int) -> dict[str, Any]:
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import Store
    from scanqueue.runners.store import RunnerStore

    url = create_pg_database()
    try:
        upgrade(url)
        res: dict[str, Any] = fill(url, other_scans, per_scan)
        store = Store(normalize_database_url(url))
        try:
            rs = RunnerStore(store)
            samples = []
            counts = None
            for _ in range(reps):
                t0 = time.perf_counter()
                counts = rs.write_diff(SCAN, 1)
                samples.append(time.perf_counter() - t0)
            assert counts is not None
            expected = (BASELINE, 500, 500, 9000, 1000)
            got = (counts.baseline_id, counts.new, counts.reopened, counts.unchanged, counts.fixed)
            assert got == expected, got
            res["diff of a 10,000-finding scan"] = {
                "median_s": round(statistics.median(samples), 3),
                "max_s": round(max(samples), 3),
                "reps": reps,
            }
            res["counts"] = {"new": 500, "reopened": 500, "unchanged": 9000, "fixed": 1000}
        finally:
            store.dispose()
        return res
    finally:
        drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-scans", type=int, default=9900)
    parser.add_argument("--per-scan", type=int, default=98)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.other_scans, args.per_scan, args.reps)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
