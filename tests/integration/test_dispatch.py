"""Bounded dispatch (docs/reference.md#policies) and re-sending lost messages, at the store level.

Real SQLite and PostgreSQL; the claim under the window must stay exact however
many claimers race (also while it swaps higher priorities in for the lowest
dispatched scans), and a due re-send must never hide behind one not yet due.
The process-level guarantees (pickup without a leader, the window seen from the
broker) are in ``tests/faults/test_dispatch_e2e.py``.
"""

from __future__ import annotations

import threading
import time

import pytest
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


def queue(store: Store, scan_id: str, priority: int = 0, key: str = "k", **cols: object) -> None:
    """A queued row already taken in (keyed), with a priority."""
    names = ["id", "status", "providers_scanned", "frameworks_scanned", "priority"]
    names += ["effective_key", "seen_at", *cols]
    values = {"id": scan_id, "priority": priority, "effective_key": key, **cols}
    with store.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO scans ({', '.join(names)}) VALUES (:id, 'queued', '[\"aws\"]',"
                " '[\"soc2\"]', :priority, :effective_key, '2020-01-01 00:00:00'"
                + "".join(f", :{c}" for c in cols)
                + ")"
            ),
            values,
        )
    time.sleep(0.003)  # created_at has millisecond precision on SQLite: keep the order


def dispatched(store: Store) -> set[str]:
    """Ids in flight: queued with ``dispatched_at`` set."""
    with store.engine.begin() as conn:
        rows = conn.execute(
            text("SELECT id FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL")
        )
        return {r.id for r in rows}


def swap_claim(
    store: Store, limit: int, window: int, key_limit: int = 0
) -> tuple[list[str], list[str]]:
    released: list[str] = []
    ids, _ = store.claim_within_window(limit, window, key_limit=key_limit, released=released)
    return ids, released


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


@pytest.mark.parametrize("look", [True, False], ids=["look", "no_look"])
def test_concurrent_claimers_keep_the_window_exact(db_url: str, store: Store, look: bool) -> None:
    """Four claimers on separate engines race; in flight never passes the window (also
    when they claim without the unlocked look, as after a start signal)."""
    insert(store, *[f"c{i:03d}" for i in range(60)])
    window = 7
    claimers = [Store(store.database_url) for _ in range(4)]
    claimed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def claim(s: Store) -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            ids, _ = s.claim_within_window(3, window, look=look)
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


def test_a_higher_priority_swaps_out_the_lowest_and_newest_dispatch(store: Store) -> None:
    for scan_id, priority in (("old0", 0), ("new0", 0), ("mid5", 5)):
        queue(store, scan_id, priority)
    assert swap_claim(store, 10, 3) == (["mid5", "old0", "new0"], [])
    age_dispatch(store, "old0", 20)
    age_dispatch(store, "new0", 10)  # dispatched after old0: released first
    queue(store, "urgent", 10)
    ids, room = store.claim_within_window(10, 3, released=(released := []))
    assert (ids, released, room) == (["urgent"], ["new0"], 0)
    assert dispatched(store) == {"urgent", "mid5", "old0"}
    assert store.get("new0").status == "queued"  # simply queued again
    # The released scan is claimed again once there is room (or it outranks).
    assert store.start_run("urgent", "test/1") is not None
    assert swap_claim(store, 10, 3) == (["new0"], [])


def test_equal_priorities_never_swap(store: Store) -> None:
    queue(store, "a5", 5)
    queue(store, "b5", 5)
    assert swap_claim(store, 10, 2) == (["a5", "b5"], [])
    queue(store, "c5", 5)
    assert swap_claim(store, 10, 2) == ([], [])
    # Pairs swap only while the waiting one strictly outranks its partner: 9 takes
    # the place of a 5, and the 5 behind it stays queued.
    queue(store, "d9", 9)
    ids, released = swap_claim(store, 10, 2)
    assert ids == ["d9"] and len(released) == 1 and released[0] in {"a5", "b5"}
    assert store.in_flight() == 2


def test_swaps_fill_the_room_first_and_stay_within_the_batch(store: Store) -> None:
    for i in range(3):
        queue(store, f"low{i}", 0)
    assert len(swap_claim(store, 10, 4)[0]) == 3  # one slot of room left
    for i in range(4):
        queue(store, f"high{i}", 9)
    ids, released = swap_claim(store, 3, 4)  # the batch: 3 in all
    assert ids == ["high0", "high1", "high2"] and len(released) == 2
    assert store.in_flight() == 4
    ids, released = swap_claim(store, 3, 4)
    assert ids == ["high3"] and len(released) == 1
    assert dispatched(store) == {f"high{i}" for i in range(4)}


def test_a_swap_respects_key_limits_pauses_and_run_after(store: Store) -> None:
    queue(store, "a0", 0, key="A")
    queue(store, "b0", 0, key="B")
    assert swap_claim(store, 10, 2, key_limit=1) == (["a0", "b0"], [])
    age_dispatch(store, "a0", 10)  # b0 is the newest dispatch: released first
    queue(store, "a9", 9, key="A")  # key A is at its limit: no swap
    queue(store, "p9", 9, key="P")
    store.pause("P")  # a paused key: no swap
    later = "2999-01-01 00:00:00"
    queue(store, "t9", 9, key="T", run_after=later)  # not due: no swap
    assert swap_claim(store, 10, 2, key_limit=1) == ([], [])
    queue(store, "c9", 9, key="C")
    assert swap_claim(store, 10, 2, key_limit=1) == (["c9"], ["b0"])
    store.pause()
    queue(store, "d9", 9, key="D")
    assert swap_claim(store, 10, 2, key_limit=1) == ([], [])  # the whole queue paused
    store.resume()
    assert swap_claim(store, 10, 2, key_limit=1) == (["d9"], ["a0"])
    # a0 released: key A has room again, and a9 is claimed at the next free slot.
    assert store.start_run("c9", "test/1") is not None
    assert swap_claim(store, 10, 2, key_limit=1) == (["a9"], [])
    assert dispatched(store) == {"a9", "d9"}
    assert store.get("p9").status == "queued" and store.get("t9").status == "queued"


def test_concurrent_claimers_with_swaps_keep_the_window_exact(db_url: str, store: Store) -> None:
    """Two claimers race while ever higher priorities arrive; the window never overflows,
    and once they stop the window holds exactly the highest."""
    window = 5
    for i in range(20):
        queue(store, f"low{i:02d}", 0)
    claimers = [Store(store.database_url) for _ in range(2)]
    watcher = Store(store.database_url)
    stop = threading.Event()
    errors: list[BaseException] = []
    most = [0]

    def claim(s: Store) -> None:
        try:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                s.claim_within_window(3, window)
        except BaseException as exc:
            errors.append(exc)

    def watch() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            most[0] = max(most[0], watcher.in_flight())

    threads = [threading.Thread(target=claim, args=(s,)) for s in claimers]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    try:
        for priority in range(1, 31):
            queue(store, f"p{priority:02d}", priority)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        assert not errors
        assert most[0] <= window
        for _ in range(20):  # settle: every swap left to do
            if not swap_claim(store, 3, window)[0]:
                break
        assert dispatched(store) == {f"p{p:02d}" for p in range(26, 31)}
    finally:
        for s in (*claimers, watcher):
            s.dispose()


def test_resend_evidence_ignores_runners_of_higher_priority(store: Store) -> None:
    """A scan of higher priority may start before an older one: not a lost message."""
    queue(store, "waiting", 0)
    queue(store, "urgent", 10)
    store.claim_for_dispatch(10)
    age_dispatch(store, "waiting", 8)
    assert store.start_run("urgent", "test/1") is not None  # dispatched ~8 s after it
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5) == []
    queue(store, "peer", 0)
    store.claim_for_dispatch(10)
    assert store.start_run("peer", "test/2") is not None  # same priority, later: overtaken
    assert store.claim_for_redispatch(60, limit=10, lost_after_s=5) == ["waiting"]
