"""`db upgrade` adopting a large, busy scans table does not stall its writers (PostgreSQL).

A writer inserts rows throughout the migration, the way a host application
would; its slowest INSERT is the stall the migration caused.  Indexes are built
``CONCURRENTLY``; a DDL statement that cannot get its table lock within the
migration's lock timeout is rolled back and retried instead of queueing every
INSERT behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import pytest

from scanqueue.config import normalize_database_url
from scanqueue.db.migrate import MIGRATION_LOCK_TIMEOUT_MS, head_revision, upgrade
from scanqueue.db.store import Store

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROWS = 300_000


def foreign_table(url: str, rows: int) -> None:
    """A host application's scans table (no scanqueue columns), already large."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE scans (id text PRIMARY KEY, status text NOT NULL,"
            " providers_scanned jsonb, frameworks_scanned jsonb, triggered_by_user text,"
            " triggered_by_token text, created_at timestamptz NOT NULL DEFAULT now(),"
            " started_at timestamptz, finished_at timestamptz, error text,"
            " findings_count integer DEFAULT 0, attempts integer DEFAULT 0)"
        )
        cur.execute(
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, created_at)"
            " SELECT 'old' || g, 'completed', '[\"aws\"]', '[]',"
            " now() - make_interval(secs => g) FROM generate_series(1, %s) g",
            (rows,),
        )
        cur.execute("ANALYZE scans")
    conn.close()


@contextmanager
def writer(url: str) -> Iterator[list[float]]:
    """Inserts queued rows back to back; yields the list of each INSERT's latency."""
    latencies: list[float] = []
    stop = threading.Event()

    def run() -> None:
        conn = psycopg2.connect(url)
        conn.autocommit = True
        i = 0
        deadline = time.monotonic() + 120
        with conn.cursor() as cur:
            while not stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                cur.execute(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                    " VALUES (%s, 'completed', '[]', '[]')",
                    (f"w{i}",),
                )
                latencies.append(time.monotonic() - t0)
                i += 1
                time.sleep(0.005)
        conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)  # the writer is going before the migration starts
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(30)


def test_adopting_a_large_busy_table_does_not_stall_its_writer(pg_url: str) -> None:
    foreign_table(pg_url, ROWS)
    store = Store(normalize_database_url(pg_url))
    try:
        with writer(pg_url) as latencies:
            t0 = time.monotonic()
            assert upgrade(store)[1] == head_revision()
            took = time.monotonic() - t0
            time.sleep(0.2)
        stall = max(latencies)
        print(
            f"\nMEASURED db upgrade adopting {ROWS} rows: {took:.2f}s;"
            f" writer's slowest INSERT {stall * 1000:.0f} ms over {len(latencies)} inserts"
        )
        assert stall < 1.0
        with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
                " WHERE c.relname = 'scans' AND NOT i.indisvalid"
            )
            assert cur.fetchone() == (0,)  # no half-built index left behind
    finally:
        store.dispose()


def test_a_lock_the_migration_cannot_get_is_retried_not_queued_behind(pg_url: str) -> None:
    """A long transaction holds scans: the ALTER gives up after the lock timeout and
    retries, so writers wait at most that long, and the upgrade still completes."""
    foreign_table(pg_url, 1000)
    blocker = psycopg2.connect(pg_url)
    with blocker.cursor() as cur:
        cur.execute("SELECT count(*) FROM scans")  # ACCESS SHARE until the transaction ends
    release = threading.Timer(2.5 * MIGRATION_LOCK_TIMEOUT_MS / 1000, blocker.rollback)
    store = Store(normalize_database_url(pg_url))
    try:
        with writer(pg_url) as latencies:
            release.start()
            t0 = time.monotonic()
            assert upgrade(store)[1] == head_revision()
            took = time.monotonic() - t0
        stall = max(latencies)
        print(
            f"\nMEASURED db upgrade behind a {2.5 * MIGRATION_LOCK_TIMEOUT_MS / 1000:.1f}s"
            f" transaction: {took:.2f}s; writer's slowest INSERT {stall * 1000:.0f} ms"
        )
        assert took >= 2.5 * MIGRATION_LOCK_TIMEOUT_MS / 1000 * 0.9  # it did wait it out
        assert stall < MIGRATION_LOCK_TIMEOUT_MS / 1000 + 1.0
    finally:
        release.cancel()
        blocker.close()
        store.dispose()
