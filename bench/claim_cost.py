"""What one claim under a full dispatch window costs the bridge (PostgreSQL).

Under a backlog the window is full and every start frees one place, so the bridge
claims one scan at a time: this is the embedded bridge's per-scan cost in the
worker's main process.  The loop runs one dispatched scan (plain SQL: started and
finished), then times ``Store.claim_within_window`` as the bridge calls it
(intake on, the default per-key limit), with and without per-key limits.

    .venv/bin/python -m bench.claim_cost [--n 500] [--backlog 10000]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from bench.harness import Db, create_pg_database, drop_pg_database, summary_ms, upgrade
from scanqueue.config import normalize_database_url
from scanqueue.db.store import store_for
from scanqueue.dispatch.intake import derive_key

WINDOW = 4


def run(db: Db, n: int, key_limit: int) -> dict[str, Any]:
    store = store_for(normalize_database_url(db.url))
    store.claim_within_window(100, WINDOW, key_limit=key_limit, derive=derive_key, intake=[])
    times: list[float] = []
    for _ in range(n):
        db.execute(
            # Started and finished at once: a key's limit counts running scans.
            "UPDATE scans SET status = 'completed', started_at = now(), finished_at = now()"
            " WHERE id = ("
            "SELECT id FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL"
            " ORDER BY dispatched_at LIMIT 1)"
        )
        began = time.perf_counter()
        ids, _room = store.claim_within_window(
            100, WINDOW, key_limit=key_limit, derive=derive_key, intake=[]
        )
        times.append(time.perf_counter() - began)
        assert len(ids) == 1, ids
    return summary_ms(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--backlog", type=int, default=10_000)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    for label, key_limit in (("no_limit", 0), ("key_limit_2", 2)):
        url = create_pg_database()
        try:
            upgrade(url)
            db = Db(url)
            prefix = f"cc-{uuid.uuid4().hex[:6]}-"
            db.insert_queued_bulk([f"{prefix}{i:06d}" for i in range(args.backlog)])
            # Spread the rows over 20 keys, as bench.policies_cost does.
            db.execute(
                "UPDATE scans SET scan_key = 'k' || (abs(hashtext(id)) %% 20)::text"
                " WHERE id LIKE %s",
                (prefix + "%",),
            )
            result[label] = run(db, args.n, key_limit)
            print(label, result[label], flush=True)
        finally:
            drop_pg_database(url)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
