"""The store's compare-and-set transitions, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from scanqueue.config import normalize_database_url
from scanqueue.db.engine import make_engine
from scanqueue.db.store import Store
from scanqueue.errors import ConflictError, NotFoundError


def insert_raw(
    store: Store,
    scan_id: str,
    providers: str = '["aws"]',
    frameworks: str = '["soc2"]',
    **cols: Any,
) -> None:
    """INSERT the way another program does: only the contract's minimal columns."""
    names = ["id", "status", "providers_scanned", "frameworks_scanned", *cols]
    values = {
        "id": scan_id,
        "status": "queued",
        "providers_scanned": providers,
        "frameworks_scanned": frameworks,
        **cols,
    }
    with store.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO scans ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)})"
            ),
            values,
        )


def test_a_plain_sql_insert_is_queued_with_millisecond_created_at(store: Store) -> None:
    insert_raw(store, "a")
    insert_raw(store, "b")
    a, b = store.get("a"), store.get("b")
    assert a.status == "queued" and a.attempts == 0 and a.findings_count == 0
    assert a.providers_scanned == ["aws"] and a.frameworks_scanned == ["soc2"]
    assert a.created_at is not None and a.created_at.tzinfo is not None
    assert a.created_at.utcoffset().total_seconds() == 0
    # Millisecond precision: two inserts a few ms apart must not share a timestamp
    # whose sub-second part is zero (SQLite's CURRENT_TIMESTAMP would give .000000).
    assert a.created_at.microsecond != 0 or b.created_at.microsecond != 0
    assert a.to_json()["created_at"].endswith("+00:00")


def test_claim_takes_oldest_first_and_never_twice(store: Store) -> None:
    for i in range(5):
        insert_raw(store, f"s{i}")
    assert store.claim_for_dispatch(3) == ["s0", "s1", "s2"]
    assert store.claim_for_dispatch(3) == ["s3", "s4"]
    assert store.claim_for_dispatch(3) == []


def test_concurrent_claims_split_the_rows(store: Store) -> None:
    for i in range(200):
        insert_raw(store, f"c{i:03d}")
    results: list[list[str]] = []
    lock = threading.Lock()

    def claim() -> None:
        while True:
            got = store.claim_for_dispatch(7)
            if not got:
                return
            with lock:
                results.append(got)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [i for batch in results for i in batch]
    assert sorted(claimed) == [f"c{i:03d}" for i in range(200)]


def test_release_makes_a_claim_dispatchable_again(store: Store) -> None:
    insert_raw(store, "r")
    assert store.claim_for_dispatch(10) == ["r"]
    store.release_dispatch(["r"])
    assert store.claim_for_dispatch(10) == ["r"]


def test_start_run_wins_once_and_counts_attempts(store: Store) -> None:
    insert_raw(store, "x", triggered_by_user="alice", triggered_by_token="s3cret")
    run = store.start_run("x", "w1")
    assert run is not None and run.attempt == 1 and run.triggered_by_token == "s3cret"
    assert "s3cret" not in repr(run)
    assert store.start_run("x", "w2") is None  # a duplicate message does nothing
    row = store.get("x")
    assert row.status == "running" and row.attempts == 1 and row.started_at is not None
    assert "triggered_by_token" not in row.to_json()


def test_finish_is_a_compare_and_set_on_the_attempt(store: Store) -> None:
    insert_raw(store, "f")
    run = store.start_run("f", "w1")
    assert run is not None
    assert store.finish_run("f", run.attempt + 1, "completed", findings_count=3) is None
    done = store.finish_run("f", run.attempt, "completed", findings_count=3)
    assert done is not None and done.status == "completed" and done.findings_count == 3
    assert done.finished_at is not None
    assert store.finish_run("f", run.attempt, "failed", error="late") is None
    assert store.get("f").status == "completed"


def test_a_rerun_starts_with_no_findings(store: Store) -> None:
    insert_raw(store, "again")
    run = store.start_run("again", "w")
    assert run is not None
    store.finish_run("again", run.attempt, "completed", findings_count=7)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE scans SET status = 'queued' WHERE id = 'again'"))
    rerun = store.start_run("again", "w")
    assert rerun is not None
    store.finish_run("again", rerun.attempt, "failed", error="boom")
    assert store.get("again").findings_count == 0


def test_cancel_queued_running_and_finished(store: Store) -> None:
    insert_raw(store, "q")
    assert store.cancel("q").status == "canceled"
    insert_raw(store, "r")
    run = store.start_run("r", "w")
    assert run is not None
    canceled = store.cancel("r")
    assert canceled.status == "canceled" and canceled.error
    assert store.heartbeat("r", run.attempt) is False
    assert store.finish_run("r", run.attempt, "completed") is None
    with pytest.raises(ConflictError):
        store.cancel("r")
    with pytest.raises(NotFoundError):
        store.cancel("nope")
    with pytest.raises(NotFoundError):
        store.get("nope")


def test_reaper_requeues_then_fails_after_max_attempts(store: Store) -> None:
    insert_raw(store, "o")
    for attempt in (1, 2):
        run = store.start_run("o", "w")
        assert run is not None and run.attempt == attempt
        assert store.reap_orphans(lease_s=3600, max_attempts=2) == []  # heartbeat is fresh
        reaped = store.reap_orphans(lease_s=0, max_attempts=2)
        assert [(r.scan_id, r.requeued) for r in reaped] == [("o", attempt < 2)]
    row = store.get("o")
    assert row.status == "failed" and "worker lost" in (row.error or "")
    assert row.attempts == 2


def test_reaper_cannot_overwrite_a_scan_that_just_finished(store: Store) -> None:
    insert_raw(store, "j")
    run = store.start_run("j", "w")
    assert run is not None
    store.finish_run("j", run.attempt, "completed")
    assert store.reap_orphans(lease_s=0, max_attempts=3) == []
    assert store.get("j").status == "completed"


def test_zombie_run_cannot_write_after_requeue(store: Store) -> None:
    insert_raw(store, "z")
    old = store.start_run("z", "w1")
    assert old is not None
    store.reap_orphans(lease_s=0, max_attempts=3)
    new = store.start_run("z", "w2")
    assert new is not None and new.attempt == old.attempt + 1
    assert store.heartbeat("z", old.attempt) is False
    assert store.finish_run("z", old.attempt, "completed") is None
    assert store.finish_run("z", new.attempt, "completed") is not None


def test_redispatch_waits_and_backs_off(store: Store) -> None:
    insert_raw(store, "lost")
    assert store.claim_for_dispatch(10) == ["lost"]
    assert store.claim_for_redispatch(older_than_s=3600, limit=10) == []
    time.sleep(0.01)  # SQLite's clock has millisecond steps
    assert store.claim_for_redispatch(older_than_s=0, limit=10) == ["lost"]
    with store.engine.begin() as conn:
        count = conn.execute(text("SELECT dispatch_count FROM scans WHERE id='lost'")).scalar_one()
    assert count == 2


def test_malformed_json_is_returned_raw_not_raised(store: Store) -> None:
    if store.dialect == "postgresql":
        pytest.skip("jsonb rejects malformed JSON at INSERT")
    insert_raw(store, "bad", providers="not json")
    assert store.get("bad").providers_scanned == "not json"


def test_list_filters_by_status(store: Store) -> None:
    for i in range(3):
        insert_raw(store, f"l{i}")
    store.cancel("l1")
    # Newest first, as the CLI and the API print them.
    assert [r.id for r in store.list_scans(status="queued")] == ["l2", "l0"]
    assert [r.id for r in store.list_scans()] == ["l2", "l1", "l0"]
    assert json.dumps([r.to_json() for r in store.list_scans()])


def test_lease_row_has_one_holder(store: Store) -> None:
    assert store.try_lease("t", "a", 30) is True
    assert store.try_lease("t", "b", 30) is False
    assert store.try_lease("t", "a", 30) is True
    store.release_lease("t", "b")  # not the holder: no effect
    assert store.try_lease("t", "b", 30) is False
    store.release_lease("t", "a")
    assert store.try_lease("t", "b", 30) is True


def test_an_unpooled_engine_connects_on_every_dialect(db_url: str) -> None:
    """``make_engine(pool=False)`` (one connection per checkout, e.g. for migrations)
    works on PostgreSQL too, where a pool size must not be passed with NullPool."""
    url = normalize_database_url(db_url)
    for autocommit in (False, True):
        engine = make_engine(url, pool=False, autocommit=autocommit)
        try:
            assert isinstance(engine.pool, NullPool)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()
