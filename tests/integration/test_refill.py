"""The bridge refills a window with scans in flight only once half of it is free
(docs/reference.md#scanqueue-settings); an empty window and a swap claim at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from sqlalchemy import bindparam, text

from scanqueue.config import normalize_database_url
from scanqueue.db.store import Store, store_for
from scanqueue.dispatch.bridge import refill_room
from scanqueue.dispatch.intake import derive_key
from tests.conftest import insert_rows, upgrade

WINDOW = 4


def _start_one(url: str) -> None:
    store = store_for(url)
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE scans SET status = 'running' WHERE id = (SELECT id FROM scans"
                " WHERE status = 'queued' AND dispatched_at IS NOT NULL ORDER BY id LIMIT 1)"
            )
        )


def test_half_a_window_must_be_free_before_the_next_claim(migrated: str) -> None:
    store = store_for(migrated)
    insert_rows(migrated, [f"s{i:02d}" for i in range(20)])
    room = refill_room(WINDOW)
    assert room == 2

    def claim() -> tuple[list[str], int]:
        return store.claim_within_window(100, WINDOW, derive=derive_key, intake=[], min_room=room)

    ids, left = claim()  # an empty window fills at once
    assert len(ids) == WINDOW and left == 0
    _start_one(migrated)
    assert claim() == ([], 1)  # one place free: wait for the next start
    _start_one(migrated)
    ids, left = claim()
    assert len(ids) == 2 and left == 0  # two at once, never more than the window
    assert store.in_flight() == WINDOW


def test_a_higher_priority_scan_swaps_in_whatever_the_room(migrated: str) -> None:
    store = store_for(migrated)
    insert_rows(migrated, [f"s{i:02d}" for i in range(10)])
    ids, _ = store.claim_within_window(100, WINDOW, derive=derive_key, intake=[], min_room=2)
    assert len(ids) == WINDOW
    insert_rows(migrated, ["urgent"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE scans SET priority = 100 WHERE id = 'urgent'"))
    released: list[str] = []
    ids, _ = store.claim_within_window(
        100, WINDOW, derive=derive_key, intake=[], released=released, min_room=2
    )
    assert ids == ["urgent"] and len(released) == 1
    assert store.in_flight() == WINDOW


def _count_looks(store: Store) -> list[bool]:
    """The store's unlocked looks from now on (one entry each: whether it asked for
    unseen rows)."""
    looks: list[bool] = []
    look = store._look

    def counted(*, unseen: bool) -> Mapping[str, Any]:
        looks.append(unseen)
        return look(unseen=unseen)

    store._look = counted  # type: ignore[method-assign]
    return looks


def test_signalled_starts_refill_without_a_look(migrated: str) -> None:
    """The embedded bridge counts its workers' start signals into the room its last
    claim left: it does not look while that is short of a refill, and claims without
    the look (on PostgreSQL one round trip) once it is not."""
    from scanqueue.dispatch.bridge import Bridge

    store = store_for(migrated)
    insert_rows(migrated, [f"s{i:02d}" for i in range(20)])
    published: list[str] = []
    bridge = Bridge(store, published.extend, 100, lambda: WINDOW, derive=derive_key)
    looks = _count_looks(store)
    assert bridge.dispatch_once() == WINDOW and bridge.window_full
    assert len(looks) == 1
    _start_one(migrated)
    assert not bridge.room_signalled(1)  # one place: not enough, and nothing looked at
    _start_one(migrated)
    assert bridge.room_signalled(1)
    assert bridge.dispatch_once() == 2
    assert len(looks) == 1  # claimed without a look
    assert len(published) == len(set(published)) == WINDOW + 2
    assert store.in_flight() == WINDOW
    assert bridge.room_signalled(0)  # no starts counted (a row, a poll): look as usual
    assert bridge.dispatch_once() == 0 and len(looks) == 2


def test_a_notified_insert_is_taken_in_and_claimed_without_a_look(migrated: str) -> None:
    """Rows inserted (the LISTEN watcher was notified) while the last claim left room:
    the next claim takes them in and claims them, with no unlocked look first."""
    from scanqueue.dispatch.bridge import Bridge

    store = store_for(migrated)
    published: list[str] = []
    taken: list[str] = []
    bridge = Bridge(
        store,
        published.extend,
        100,
        lambda: WINDOW,
        derive=derive_key,
        on_intake=lambda rows: taken.extend(r.scan_id for r in rows),
    )
    looks = _count_looks(store)
    assert bridge.dispatch_once() == 0 and len(looks) == 1  # empty: the room is known
    insert_rows(migrated, ["new-1", "new-2"])
    assert bridge.room_signalled(0, notified=True)
    assert bridge.dispatch_once() == 2
    assert len(looks) == 1
    assert sorted(taken) == sorted(published) == ["new-1", "new-2"]
    assert all(store.get(i).key for i in published)  # taken in: keyed


def test_intake_events_follow_the_publish_and_survive_its_failure(migrated: str) -> None:
    """The scan.queued of a claimed row is reported after its message went out (off
    the pickup's path), and also when the publish failed (the rows were taken in)."""
    from scanqueue.dispatch.bridge import Bridge, PublishError

    store = store_for(migrated)
    order: list[str] = []
    fail = [False]

    def publish(ids: list[str]) -> None:
        if fail[0]:
            raise PublishError(0, ConnectionError("broker down"))
        order.extend(f"published {i}" for i in ids)

    bridge = Bridge(
        store,
        publish,
        100,
        lambda: WINDOW,
        derive=derive_key,
        on_intake=lambda rows: order.extend(f"taken {r.scan_id}" for r in rows),
    )
    insert_rows(migrated, ["first"])
    assert bridge.dispatch_once() == 1
    assert order == ["published first", "taken first"]
    order.clear()
    fail[0] = True
    insert_rows(migrated, ["second"])
    with pytest.raises(PublishError):
        bridge.dispatch_once()
    assert order == ["taken second"]
    assert store.get("second").status == "queued"  # released for the next claim


def _seen(url: str, ids: list[str]) -> dict[str, bool]:
    store = store_for(normalize_database_url(url))
    with store.engine.begin() as conn:
        rows = conn.execute(
            text("SELECT id, seen_at IS NOT NULL AS seen FROM scans WHERE id IN :ids").bindparams(
                bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).all()
    return {r.id: bool(r.seen) for r in rows}


def test_notified_without_policies_postgresql_claims_first_and_takes_in_the_rest_after(
    pg_url: str,
) -> None:
    """PostgreSQL, no pause or limit: on a NOTIFY the claim goes first (it takes in
    the rows it claims); the rest (beyond the window, malformed) are taken in after
    the publish, and every row gets its scan.queued."""
    from scanqueue.dispatch.bridge import Bridge
    from tests.integration.test_policies import insert_malformed

    upgrade(pg_url)
    store = store_for(normalize_database_url(pg_url))
    seen_at_publish: dict[str, bool] = {}
    published: list[str] = []
    taken: list[str] = []
    failed: list[str] = []

    def publish(ids: list[str]) -> None:
        seen_at_publish.update(_seen(pg_url, [f"n{i}" for i in range(6)] + ["bad"]))
        published.extend(ids)

    def on_intake(rows: Any) -> None:
        taken.extend(r.scan_id for r in rows if r.error is None)
        failed.extend(r.scan_id for r in rows if r.error is not None)

    bridge = Bridge(store, publish, 100, lambda: WINDOW, derive=derive_key, on_intake=on_intake)
    assert bridge.dispatch_once() == 0  # the first claim: no policies found
    assert store.claims_unseen()
    insert_rows(pg_url, [f"n{i}" for i in range(6)])
    insert_malformed(store, "bad")
    assert bridge.room_signalled(0, notified=True)
    looks = _count_looks(store)
    assert bridge.dispatch_once() == WINDOW
    assert looks == []
    assert published == [f"n{i}" for i in range(WINDOW)]
    # At the publish: the claimed rows seen (by the claim), the rest not yet.
    assert seen_at_publish == {
        **{f"n{i}": True for i in range(WINDOW)},
        "n4": False,
        "n5": False,
        "bad": False,
    }
    assert sorted(taken) == [f"n{i}" for i in range(6)]
    assert failed == ["bad"] and store.get("bad").status == "failed"
    assert all(_seen(pg_url, [f"n{i}" for i in range(6)]).values())
    assert store.get("n5").key == "aws|soc2" and store.get("n0").key == "aws|soc2"


def test_a_limit_set_since_the_last_claim_is_obeyed_and_the_rows_claimed_at_once(
    pg_url: str,
) -> None:
    """A limit set since the last claim: the claim keys the unseen rows and judges
    them by that key (two of three within the limit); the intake after the publish
    takes in the third, and the same drain claims again and finds its key full."""
    from scanqueue.dispatch.bridge import Bridge

    upgrade(pg_url)
    store = store_for(normalize_database_url(pg_url))
    published: list[str] = []
    bridge = Bridge(store, published.extend, 100, lambda: WINDOW, derive=derive_key)
    assert bridge.drain() == 0 and store.claims_unseen()
    store.set_limit("aws|soc2", 2)
    insert_rows(pg_url, ["a", "b", "c"])
    assert bridge.room_signalled(0, notified=True)
    assert bridge.drain() == 2
    assert published == ["a", "b"] and store.last_claim_policed()
    assert store.get("c").status == "queued" and store.get("c").key == "aws|soc2"
    assert store.get("a").key == "aws|soc2"


def test_a_claim_that_took_in_every_unseen_row_saves_the_intake_round_trip(pg_url: str) -> None:
    """One row inserted and claimed (the usual pickup): the claim says no unseen row is
    left, so no intake statement follows the publish."""
    from scanqueue.dispatch.bridge import Bridge

    upgrade(pg_url)
    store = store_for(normalize_database_url(pg_url))
    intakes: list[int] = []
    take_in_direct = store.take_in_direct

    def counted(limit: int = 500) -> Any:
        intakes.append(limit)
        return take_in_direct(limit)

    store.take_in_direct = counted  # type: ignore[method-assign]
    taken: list[str] = []
    bridge = Bridge(
        store,
        lambda ids: None,
        100,
        lambda: WINDOW,
        derive=derive_key,
        on_intake=lambda rows: taken.extend(r.scan_id for r in rows),
    )
    assert bridge.dispatch_once() == 0
    insert_rows(pg_url, ["only"])
    assert bridge.room_signalled(0, notified=True)
    assert bridge.dispatch_once() == 1
    assert taken == ["only"] and intakes == []
    insert_rows(pg_url, ["later"])
    store.set_limit("other", 1)  # under policies too, the claim takes "later" in
    assert bridge.room_signalled(0, notified=True)
    assert bridge.drain() == 1
    assert taken == ["only", "later"] and intakes == []


def _insert_keyed(url: str, rows: list[tuple[str, str, int]]) -> None:
    """Queued rows with a scan_key and a priority, as another program writes them."""
    store = store_for(normalize_database_url(url))
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " scan_key, priority) VALUES (:id, 'queued', '[\"aws\"]', '[\"soc2\"]', :k, :p)"
            ),
            [{"id": i, "k": k, "p": p} for i, k, p in rows],
        )


def test_under_a_pause_and_a_limit_the_claim_keys_new_rows_and_judges_them_by_key(
    pg_url: str,
) -> None:
    """PostgreSQL, policies set: on a NOTIFY the claim still goes first.  It keys the
    unseen rows as the intake would and judges them by that key: the paused key's row
    and the limited key's second row stay queued (taken in after the publish), the
    others go, and a malformed row is failed after the publish."""
    from scanqueue.dispatch.bridge import Bridge
    from tests.integration.test_policies import insert_malformed

    upgrade(pg_url)
    store = store_for(normalize_database_url(pg_url))
    ids = ["p1", "l1", "l2", "f1", "bad"]
    seen_at_publish: dict[str, bool] = {}
    published: list[str] = []

    def publish(claimed: list[str]) -> None:
        seen_at_publish.update(_seen(pg_url, ids))
        published.extend(claimed)

    taken: list[str] = []
    bridge = Bridge(
        store,
        publish,
        100,
        lambda: WINDOW,
        derive=derive_key,
        on_intake=lambda rows: taken.extend(r.scan_id for r in rows),
    )
    store.pause("paused")
    store.set_limit("limited", 1)
    assert bridge.dispatch_once() == 0 and store.last_claim_policed()
    _insert_keyed(pg_url, [("p1", "paused", 0), ("l1", "limited", 0), ("l2", "limited", 0)])
    _insert_keyed(pg_url, [("f1", "free", 0)])
    insert_malformed(store, "bad")
    assert bridge.room_signalled(0, notified=True)
    looks = _count_looks(store)
    assert bridge.dispatch_once() == 2
    assert looks == []  # no look, no intake before the claim
    assert published == ["l1", "f1"]
    assert seen_at_publish == {"p1": False, "l1": True, "l2": False, "f1": True, "bad": False}
    assert sorted(taken) == sorted(ids)
    assert [store.get(i).key for i in ("p1", "l2")] == ["paused", "limited"]
    assert store.get("p1").status == store.get("l2").status == "queued"
    assert store.get("bad").status == "failed"


def test_a_new_row_behind_a_full_keys_backlog_is_claimed_in_the_same_drain(
    pg_url: str,
) -> None:
    """Under a limit, the claim's search past the full keys at the head of the order
    reads keyed rows only: a new row behind 200 rows of a full key is passed over by
    the claim, taken in after it, and claimed by the same drain."""
    from scanqueue.dispatch.bridge import Bridge

    upgrade(pg_url)
    store = store_for(normalize_database_url(pg_url))
    published: list[str] = []
    bridge = Bridge(store, published.extend, 100, lambda: WINDOW, derive=derive_key)
    store.set_limit("hot", 1)
    _insert_keyed(pg_url, [(f"hot{i:03d}", "hot", 10) for i in range(200)])
    assert bridge.drain() == 1 and published == ["hot000"]
    assert bridge.drain() == 0  # every hot row taken in; the key is full
    _insert_keyed(pg_url, [("cold", "cold", 0)])
    assert bridge.room_signalled(0, notified=True)
    assert bridge.drain() == 1
    assert published == ["hot000", "cold"]
