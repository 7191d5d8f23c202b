"""The store's compare-and-set transitions, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
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
from tests.claimed import mark_dispatched


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


def insert_claimed(store: Store, scan_id: str, **cols: Any) -> None:
    """A queued row, claimed as a bridge would (only a claimed scan starts)."""
    insert_raw(store, scan_id, **cols)
    mark_dispatched(store, scan_id)


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
    insert_claimed(store, "x", triggered_by_user="alice", triggered_by_token="s3cret")
    run = store.start_run("x", "w1")
    assert run is not None and run.attempt == 1 and run.triggered_by_token == "s3cret"
    assert "s3cret" not in repr(run)
    assert store.start_run("x", "w2") is None  # a duplicate message does nothing
    row = store.get("x")
    assert row.status == "running" and row.attempts == 1 and row.started_at is not None
    assert "triggered_by_token" not in row.to_json()


# -- the start: a message is a start token (docs/reference.md#lifecycle) -------------------


def dispatched_state(store: Store) -> dict[str, tuple[str, bool]]:
    """Each row's status and whether it is dispatched."""
    with store.engine.begin() as conn:
        rows = conn.execute(text("SELECT id, status, dispatched_at FROM scans")).all()
    return {r.id: (r.status, r.dispatched_at is not None) for r in rows}


def test_only_a_claimed_scan_starts(store: Store) -> None:
    insert_raw(store, "unclaimed")
    assert store.start_run("unclaimed", "w") is None
    assert store.get("unclaimed").status == "queued" and store.get("unclaimed").attempts == 0
    mark_dispatched(store, "unclaimed")
    started = store.start_run("unclaimed", "w")
    assert started is not None and started.scan_id == "unclaimed"


def test_a_lower_priority_message_starts_the_dispatched_higher_one_and_releases_its_own(
    store: Store,
) -> None:
    insert_claimed(store, "low")
    insert_claimed(store, "mid", priority=5)
    insert_claimed(store, "h1", priority=9, triggered_by_token="tok-h1")
    time.sleep(0.01)  # SQLite's clock has millisecond steps: h1 is the older one
    insert_claimed(store, "h2", priority=9)
    insert_raw(store, "unclaimed", priority=50)  # no message may start a row never claimed
    started = store.start_run("low", "w")
    assert started is not None and (started.scan_id, started.attempt) == ("h1", 1)
    assert started.triggered_by_token == "tok-h1"  # the started row's, for its runner
    state = dispatched_state(store)
    assert state["h1"] == ("running", True)
    assert state["low"] == ("queued", False)  # released: the bridge claims it again
    assert state["mid"] == state["h2"] == ("queued", True)
    assert state["unclaimed"] == ("queued", False)
    assert store.get("low").attempts == 0
    assert store.start_run("h1", "w") is None  # its own message is a duplicate now
    assert store.start_run("low", "w") is None  # a stale copy of a released row's message
    started = store.start_run("mid", "w")
    assert started is not None and started.scan_id == "h2"
    # Nothing higher is dispatched: a message starts its own scan.
    mark_dispatched(store, "low", "mid")
    started = store.start_run("mid", "w")
    assert started is not None and started.scan_id == "mid"
    assert store.in_flight() == 1  # low, claimed again


def test_the_highest_dispatched_message_starts_itself(store: Store) -> None:
    insert_claimed(store, "top", priority=3)
    insert_claimed(store, "below", priority=1)
    started = store.start_run("top", "w")
    assert started is not None and started.scan_id == "top"
    assert dispatched_state(store)["below"] == ("queued", True)


def test_equal_priorities_never_swap(store: Store) -> None:
    insert_claimed(store, "older", priority=4)
    time.sleep(0.01)
    insert_claimed(store, "newer", priority=4)
    started = store.start_run("newer", "w")
    assert started is not None and started.scan_id == "newer"  # not the older one
    assert dispatched_state(store)["older"] == ("queued", True)


def test_a_stale_message_of_a_released_or_handed_back_row_starts_nothing(store: Store) -> None:
    insert_claimed(store, "waiting", priority=9)  # what a stale message could take
    insert_raw(store, "released")
    assert store.claim_for_dispatch(10) == ["released"]
    store.release_dispatch(["released"])  # its publish failed
    assert store.start_run("released", "w") is None
    insert_claimed(store, "handed")
    run = store.start_run("handed", "w/1")  # starts "waiting" (higher)
    assert run is not None and run.scan_id == "waiting"
    mark_dispatched(store, "handed")
    run = store.start_run("handed", "w/1")
    assert run is not None and run.scan_id == "handed"
    assert store.hand_back_run("handed", run.attempt, "w/1")  # a run told to stop
    assert store.start_run("handed", "w") is None
    insert_claimed(store, "shut")
    mark_dispatched(store, "shut")
    assert store.start_run("shut", "host:1:aa/11:x") is not None
    assert store.hand_back("host:1:aa") == ["shut"]  # a worker's graceful shutdown
    assert store.start_run("shut", "w") is None
    insert_claimed(store, "gone")
    store.cancel("gone")
    assert store.start_run("gone", "w") is None
    state = dispatched_state(store)
    assert state["released"] == state["handed"] == state["shut"] == ("queued", False)
    assert store.get("handed").attempts == 1 and store.get("shut").attempts == 0


def test_a_stale_message_never_starts_a_higher_dispatched_scan(store: Store) -> None:
    insert_claimed(store, "high", priority=9)
    insert_raw(store, "never")  # never claimed
    insert_claimed(store, "done")
    run = store.start_run("done", "w")  # starts "high"
    assert run is not None and run.scan_id == "high"
    insert_claimed(store, "high2", priority=9)
    assert store.start_run("never", "w") is None
    assert store.start_run("done", "w") is None  # released by the swap above
    assert dispatched_state(store)["high2"] == ("queued", True)


def test_concurrent_starts_never_start_one_scan_twice(store: Store) -> None:
    """Messages (each scan's twice, as after a re-send) race on many threads: no scan
    starts twice, each message starts at most one, and none is left claimed."""
    ids = [f"c{i:02d}" for i in range(40)]
    for i, scan_id in enumerate(ids):
        insert_raw(store, scan_id, priority=(i * 7) % 4)
    mark_dispatched(store, *ids)
    messages = [scan_id for scan_id in ids for _ in range(2)]
    random.Random(17).shuffle(messages)
    started: list[str] = []
    lock = threading.Lock()
    threads = 8
    barrier = threading.Barrier(threads)

    def work(mine: list[str]) -> None:
        barrier.wait(30)
        for scan_id in mine:
            run = store.start_run(scan_id, f"w/{threading.get_ident()}")
            if run is not None:
                with lock:
                    started.append(run.scan_id)

    workers = [threading.Thread(target=work, args=(messages[k::threads],)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not any(t.is_alive() for t in workers)
    assert len(started) == len(set(started))
    state = dispatched_state(store)
    running = {i for i, (status, _) in state.items() if status == "running"}
    assert running == set(started)
    assert all(state[i] == ("queued", False) for i in set(ids) - running)  # released
    assert all(store.get(i).attempts == 1 for i in running)
    assert store.in_flight() == 0


def test_finish_is_a_compare_and_set_on_the_attempt(store: Store) -> None:
    insert_claimed(store, "f")
    run = store.start_run("f", "w1")
    assert run is not None
    assert store.finish_run("f", run.attempt + 1, "completed", findings_count=3) is None
    done = store.finish_run("f", run.attempt, "completed", findings_count=3)
    assert done is not None and done.status == "completed" and done.findings_count == 3
    assert done.finished_at is not None
    assert store.finish_run("f", run.attempt, "failed", error="late") is None
    assert store.get("f").status == "completed"


def test_a_rerun_starts_with_no_findings(store: Store) -> None:
    insert_claimed(store, "again")
    run = store.start_run("again", "w")
    assert run is not None
    store.finish_run("again", run.attempt, "completed", findings_count=7)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE scans SET status = 'queued' WHERE id = 'again'"))
    mark_dispatched(store, "again")
    rerun = store.start_run("again", "w")
    assert rerun is not None
    store.finish_run("again", rerun.attempt, "failed", error="boom")
    assert store.get("again").findings_count == 0


def test_cancel_queued_running_and_finished(store: Store) -> None:
    insert_raw(store, "q")
    assert store.cancel("q").status == "canceled"
    insert_claimed(store, "r")
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
    insert_claimed(store, "o")
    for attempt in (1, 2):
        mark_dispatched(store, "o")  # the re-queued scan is claimed again
        run = store.start_run("o", "w")
        assert run is not None and run.attempt == attempt
        assert store.reap_orphans(lease_s=3600, max_attempts=2) == []  # heartbeat is fresh
        reaped = store.reap_orphans(lease_s=0, max_attempts=2)
        assert [(r.scan_id, r.requeued) for r in reaped] == [("o", attempt < 2)]
    row = store.get("o")
    assert row.status == "failed" and "worker lost" in (row.error or "")
    assert row.attempts == 2


def test_reaper_cannot_overwrite_a_scan_that_just_finished(store: Store) -> None:
    insert_claimed(store, "j")
    run = store.start_run("j", "w")
    assert run is not None
    store.finish_run("j", run.attempt, "completed")
    assert store.reap_orphans(lease_s=0, max_attempts=3) == []
    assert store.get("j").status == "completed"


def test_zombie_run_cannot_write_after_requeue(store: Store) -> None:
    insert_claimed(store, "z")
    old = store.start_run("z", "w1")
    assert old is not None
    store.reap_orphans(lease_s=0, max_attempts=3)
    assert store.start_run("z", "w2") is None  # re-queued, not claimed yet
    mark_dispatched(store, "z")
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
