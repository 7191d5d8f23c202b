"""The per-scan statements on PostgreSQL, run on held DB-API connections (direct_sql)."""

from __future__ import annotations

import gc
import os
import threading
import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import text

from scanqueue.config import normalize_database_url
from scanqueue.db.claim_sql import PG_PLAIN_STATEMENT_NAME
from scanqueue.db.engine import make_engine
from scanqueue.db.store import Store, store_for
from scanqueue.errors import UnavailableError
from tests.claimed import mark_dispatched
from tests.conftest import upgrade


@pytest.fixture
def url(pg_url: str) -> str:
    upgrade(pg_url)
    return normalize_database_url(pg_url)


def insert(store: Store, token: str = "secret-token") -> str:
    scan_id = f"d-{uuid.uuid4().hex[:10]}"
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " triggered_by_user, triggered_by_token)"
                " VALUES (:id, 'queued', '[\"aws\"]', '[\"cis\"]', 'ann', :token)"
            ),
            {"id": scan_id, "token": token},
        )
    mark_dispatched(store, scan_id)  # claimed, as by a bridge: only a claimed scan starts
    return scan_id


def backend_pid(store: Store) -> int:
    assert store._direct is not None
    conn: Any = store._direct._connection()
    return int(conn.dbapi_connection.info.backend_pid)


def test_direct_and_sqlalchemy_paths_return_the_same(url: str) -> None:
    direct = store_for(url)
    assert direct._direct is not None
    plain = Store(url, engine=make_engine(url))  # a given engine takes the SQLAlchemy path
    assert plain._direct is None
    try:
        a, b = insert(direct), insert(direct)
        started_a, started_b = direct.start_run(a, "w/1"), plain.start_run(b, "w/1")
        assert started_a is not None and started_b is not None
        for field in ("attempt", "providers_raw", "frameworks_raw", "triggered_by_user"):
            assert getattr(started_a, field) == getattr(started_b, field)
        assert started_a.triggered_by_token == "secret-token"
        for started in (started_a, started_b):
            assert started.started_at is not None and started.started_at.utcoffset() is not None
            assert started.started_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert direct.heartbeat(a, 1) and plain.heartbeat(b, 1)
        assert not direct.heartbeat(a, 2)  # not this run's lease
        row_a = direct.finish_run(a, 1, "completed", findings_count=3)
        row_b = plain.finish_run(b, 1, "completed", findings_count=3)
        assert row_a is not None and row_b is not None
        assert replace(row_a, finished_at=None) == replace(row_b, finished_at=None)
        assert row_a.status == "completed" and row_a.findings_count == 3
        assert row_a.finished_at is not None and row_a.finished_at.utcoffset() is not None
        assert direct.finish_run(a, 1, "failed") is None  # a CAS: it already finished
        assert direct.start_run(a, "w/1") is None  # and it is not queued
    finally:
        plain.dispose()


def test_the_swap_takes_the_same_turn_on_both_paths(url: str) -> None:
    """A lower priority's message starts the dispatched higher one on either path."""
    direct = store_for(url)
    plain = Store(url, engine=make_engine(url))
    try:
        for store in (direct, plain):
            low, high = insert(store), insert(store)
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE scans SET priority = 7 WHERE id = :id"), {"id": high})
            started = store.start_run(low, "w/1")
            assert started is not None and started.scan_id == high
            assert started.triggered_by_token == "secret-token"
            assert store.status_of(low) == ("queued", 0)
            assert store.start_run(low, "w/1") is None  # released: its message is spent
            assert store.start_run(high, "w/1") is None  # running: a duplicate
            assert store.in_flight() == 0
    finally:
        plain.dispose()


def test_a_connection_killed_under_it_is_unavailable_once_then_replaced(url: str) -> None:
    store = store_for(url)
    scan_id = insert(store)
    assert store.start_run(scan_id, "w/1") is not None
    old_pid = backend_pid(store)
    with store.engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": old_pid})
    with pytest.raises(UnavailableError) as raised:
        store.heartbeat(scan_id, 1)
    assert "secret-token" not in str(raised.value)
    assert store.heartbeat(scan_id, 1)  # on a fresh connection
    assert backend_pid(store) != old_pid


def test_each_thread_holds_its_own_connection_and_gives_it_back_when_it_ends(url: str) -> None:
    store = store_for(url)
    scan_id = insert(store)
    assert store.start_run(scan_id, "w/1") is not None
    pids: list[int] = []

    def beat() -> None:
        assert store.heartbeat(scan_id, 1)
        pids.append(backend_pid(store))

    thread = threading.Thread(target=beat)
    thread.start()
    thread.join()
    assert pids and pids[0] != backend_pid(store)
    pool: Any = store._autocommit_engine.pool
    held_before = pool.checkedout()
    store.heartbeat(scan_id, 1)  # no new thread: nothing to give back
    assert pool.checkedout() == held_before
    other = threading.Thread(target=beat)  # taking one for a new thread gives back the ended one's
    other.start()
    other.join()
    assert pool.checkedout() == held_before


def test_a_forked_child_leaves_the_parents_connection_working(url: str) -> None:
    store = store_for(url)
    scan_id = insert(store)
    assert store.start_run(scan_id, "w/1") is not None
    parent_pid = backend_pid(store)
    child_scan = insert(store)
    pid = os.fork()
    if pid == 0:  # the child: a store of its own; the inherited one is dropped and collected
        code = 1
        try:
            del store
            mine = store_for(url)
            code = 0 if mine.start_run(child_scan, "w/2") else 2
            del mine
            gc.collect()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.heartbeat(scan_id, 1)  # the parent's held connection still works
    assert backend_pid(store) == parent_pid
    assert store.status_of(child_scan) == ("running", 1)


def test_a_connection_held_past_the_recycle_age_goes_back_to_the_pool(url: str) -> None:
    store = store_for(url)
    direct = store._direct
    assert direct is not None
    scan_id = insert(store)
    assert store.start_run(scan_id, "w/1") is not None
    pool: Any = store._autocommit_engine.pool
    first = direct._connection()
    direct.recycle_s = 0.0
    try:
        assert store.heartbeat(scan_id, 1)
        assert direct._connection() is not first  # checked out again
        assert pool.checkedout() == 1  # the old one went back: none leaked
    finally:
        direct.recycle_s = 1800.0


def _prepared_names(store: Store) -> set[str]:
    assert store._direct is not None
    cur = store._direct._connection().cursor()
    try:
        cur.execute("SELECT name FROM pg_prepared_statements")
        return {row[0] for row in cur.fetchall()}
    finally:
        cur.close()


def test_the_per_scan_statements_are_prepared_once_per_connection(url: str) -> None:
    """Start, heartbeat and finish run as EXECUTEs of statements the session prepared
    once, with the statuses written in (so generic plans keep the partial indexes)."""
    store = store_for(url)
    try:
        for _ in range(3):
            scan_id = insert(store)
            started = store.start_run(scan_id, "w/1")
            assert started is not None
            assert store.heartbeat(scan_id, started.attempt, worker_id="w/1")
            assert store.finish_run(scan_id, started.attempt, "completed", worker_id="w/1")
        assert store._direct_start.prepared is not None
        assert "'queued'" in store._direct_start.prepared.prepare_sql
        names = {
            s.prepared.name
            for s in (store._direct_start, store._direct_heartbeat, store._direct_finish)
            if s.prepared is not None
        }
        assert len(names) == 3 and names <= _prepared_names(store)
    finally:
        store.dispose()


def test_a_session_that_lost_its_prepared_statements_prepares_again(url: str) -> None:
    """DISCARD ALL (or a transaction-pooling proxy moving the session) drops them: the
    call that finds one gone runs unprepared, the next prepares again, and a
    connection that keeps losing them stops preparing."""
    from scanqueue.db.direct_sql import MAX_PREPARE_MISSES

    store = store_for(url)
    assert store._direct is not None
    try:

        def discard() -> None:
            assert store._direct is not None
            cur = store._direct._connection().cursor()
            cur.execute("DISCARD ALL")
            cur.close()

        def one_run() -> None:
            scan_id = insert(store)
            started = store.start_run(scan_id, "w/1")
            assert started is not None
            assert store.finish_run(scan_id, started.attempt, "completed", worker_id="w/1")

        one_run()
        discard()
        one_run()  # the start finds its statement gone: run plain, prepare next time
        one_run()
        assert store._direct_start.prepared is not None
        assert store._direct_start.prepared.name in _prepared_names(store)
        for _ in range(MAX_PREPARE_MISSES):
            discard()
            one_run()
        discard()
        one_run()
        assert _prepared_names(store) == set()  # this connection runs them plain now
    finally:
        store.dispose()


def test_the_one_trip_claim_survives_a_session_that_lost_its_statement(url: str) -> None:
    """The bridge's claim (lock and EXECUTE in one query string) runs its statement
    unprepared when the session lost it, then prepares it again."""
    store = store_for(url)
    assert store._direct is not None
    try:
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                    " seen_at, effective_key) SELECT 'c' || g, 'queued', '[\"aws\"]',"
                    " '[\"cis\"]', now(), 'k' FROM generate_series(1, 6) g"
                )
            )
        first, _ = store.claim_within_window(2, 100, look=False)
        cur = store._direct._connection().cursor()
        cur.execute("DISCARD ALL")
        cur.close()
        second, _ = store.claim_within_window(2, 100, look=False)  # unprepared
        third, room = store.claim_within_window(2, 100, look=False)  # prepared again
        claimed = first + second + third
        assert len(claimed) == len(set(claimed)) == 6 and room == 94
        assert PG_PLAIN_STATEMENT_NAME in _prepared_names(store)  # no pause or limit: plain
    finally:
        store.dispose()
