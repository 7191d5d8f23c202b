"""Bounded dispatch (docs/reference.md#policies) and re-sending lost messages, at the store level.

Real SQLite and PostgreSQL; the claim under the window must stay exact however
many claimers race, and a due re-send must never hide behind one not yet due.
The process-level guarantees (pickup without a leader, the window seen from the
broker) are in ``tests/faults/test_dispatch_e2e.py``.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from scanqueue.db.store import Store, store_for
from scanqueue.dispatch.bridge import default_window


def insert(store: Store, *ids: str) -> None:
    with store.engine.begin() as conn:
        for scan_id in ids:
            conn.execute(
                text(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned)"
                    " VALUES (:id, 'queued', '[\"aws\"]', '[\"soc2\"]')"
                ),
                {"id": scan_id},
            )


def age_dispatch(store: Store, scan_id: str, seconds: float, count: int | None = None) -> None:
    """Move a scan's ``dispatched_at`` ``seconds`` into the past (and set its count)."""
    if store.dialect == "postgresql":
        stamp = f"clock_timestamp() - make_interval(secs => {seconds})"
    else:
        stamp = f"strftime('%Y-%m-%d %H:%M:%f','now','-{seconds} seconds')"
    extra = "" if count is None else ", dispatch_count = :count"
    with store.engine.begin() as conn:
        conn.execute(
            text(f"UPDATE scans SET dispatched_at = {stamp}{extra} WHERE id = :id"),
            {"id": scan_id, "count": count},
        )


def test_a_claim_never_exceeds_the_window_and_a_start_frees_room(store: Store) -> None:
    insert(store, *[f"w{i}" for i in range(10)])
    ids, room = store.claim_within_window(100, 4)
    assert ids == ["w0", "w1", "w2", "w3"] and room == 0
    assert store.claim_within_window(100, 4) == ([], 0)
    assert store.in_flight() == 4
    assert store.start_run("w0", "test/1") is not None  # started: no longer in flight
    ids, room = store.claim_within_window(100, 4)
    assert ids == ["w4"] and room == 0
    # The batch bounds a claim too.
    assert store.claim_within_window(1, 10) == (["w5"], 5)


def test_concurrent_claimers_keep_the_window_exact(db_url: str, store: Store) -> None:
    """Four claimers on separate engines race; in flight never passes the window."""
    insert(store, *[f"c{i:03d}" for i in range(60)])
    window = 7
    claimers = [Store(store.database_url) for _ in range(4)]
    claimed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def claim(s: Store) -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            ids, _ = s.claim_within_window(3, window)
            with lock:
                claimed.extend(ids)

    threads = [threading.Thread(target=claim, args=(s,)) for s in claimers]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(30)
    try:
        assert len(claimed) == window and len(set(claimed)) == window
        assert store.in_flight() == window
    finally:
        for s in claimers:
            s.dispose()


def test_default_window_is_twice_the_live_slots_at_least_four() -> None:
    assert default_window(0) == 4
    assert default_window(1) == 4
    assert default_window(6) == 12


def test_workers_register_refresh_go_stale_and_unregister(store: Store) -> None:
    assert store.live_worker_slots(20) == 0
    store.register_worker("h:1:a", "h", 1, 6)
    store.register_worker("h:2:b", "h", 2, 3)
    assert store.live_worker_slots(20) == 9
    store.register_worker("h:2:b", "h", 2, 4)  # a refresh may change the slots
    assert store.live_worker_slots(20) == 10
    assert [w["id"] for w in store.live_workers(20)] == ["h:1:a", "h:2:b"]
    stamp = (
        "clock_timestamp() - interval '1 minute'"
        if store.dialect == "postgresql"
        else "strftime('%Y-%m-%d %H:%M:%f','now','-60 seconds')"
    )
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE scanqueue_workers SET heartbeat_at = {stamp} WHERE pid = 1"))
    assert store.live_worker_slots(20) == 4  # the silent one no longer counts
    assert store.forget_workers(30) == 1
    store.unregister_worker("h:2:b")
    assert store.live_workers(3600) == []


def test_a_due_resend_is_never_hidden_by_ones_not_yet_due(store: Store) -> None:
    """The oldest dispatches are backing off; the due one behind them still goes out."""
    insert(store, "backing1", "backing2", "due")
    store.claim_for_dispatch(10)
    age_dispatch(store, "backing1", 100, count=5)  # waits 10 × 2^4 = 160 s
    age_dispatch(store, "backing2", 90, count=5)
    age_dispatch(store, "due", 20, count=1)  # waits 10 s
    assert store.claim_for_redispatch(10, limit=1) == ["due"]
    assert store.claim_for_redispatch(10, limit=10) == []  # just re-sent: waits again


def test_an_overtaken_dispatch_is_resent_early(store: Store) -> None:
    """A scan dispatched later is running: the older message was lost."""
    insert(store, "lost", "later")
    store.claim_for_dispatch(10)
    age_dispatch(store, "lost", 8)
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5) == []  # nothing overtook it
    assert store.start_run("later", "test/1") is not None  # dispatched ~8 s after "lost"
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5) == ["lost"]


def test_a_dispatch_waiting_while_slots_are_free_is_resent_early(store: Store) -> None:
    insert(store, "waiting")
    store.claim_for_dispatch(10)
    age_dispatch(store, "waiting", 8)
    # Every slot busy (none live): only the long rule applies.
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5, live_slots=0) == []
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5, live_slots=2) == ["waiting"]


def test_a_resend_while_saturated_does_not_grow_the_window(store: Store) -> None:
    insert(store, "a", "b", "c")
    assert store.claim_within_window(10, 2)[0] == ["a", "b"]
    age_dispatch(store, "a", 100)
    assert store.claim_for_redispatch(30, limit=10) == ["a"]
    assert store.in_flight() == 2 and store.claim_within_window(10, 2) == ([], 0)


def test_queue_depth_is_counted_once_per_interval(store: Store) -> None:
    insert(store, "d1")
    assert store.queue_depth(max_age_s=60) == 1
    insert(store, "d2")
    assert store.queue_depth(max_age_s=60) == 1  # the shared count of this interval
    assert store.queue_depth() == 2  # no max age: counted now


def test_store_for_shares_the_depth_cache_in_a_process(db_url: str, store: Store) -> None:
    assert store_for(store.database_url) is store
