"""Scan policies in the store (docs/reference.md#policies), on SQLite and PostgreSQL: claim order,
run_after, pauses, per-key limits (past a blocked hot key), the claim's cost (one
statement on PostgreSQL; flat with the backlog when every key is full), intake of
plain-SQL rows (keys, malformed rows failed), dedup under concurrency, labels."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from scanqueue.config import normalize_database_url
from scanqueue.db.claim_sql import (
    PG_PLAIN_STATEMENT_NAME,
    PG_PLANNER_SETTINGS,
    PG_STATEMENT_NAME,
    fast_rows,
    policy_claim_sql,
)
from scanqueue.db.policies import Intake
from scanqueue.db.scan_request import InvalidScanRequest, validate_scan_request
from scanqueue.db.store import Store, store_for
from scanqueue.dispatch.intake import derive_key
from tests.conftest import insert_rows, upgrade


def add(store: Store, **body: Any) -> str:
    body.setdefault("providers", ["aws"])
    row, _ = store.enqueue_request(validate_scan_request(body))
    time.sleep(0.003)  # created_at has millisecond precision on SQLite: keep the order
    return row.id


def claim(store: Store, n: int = 100, window: int = 1000, key_limit: int = 0) -> list[str]:
    return store.claim_within_window(n, window, key_limit=key_limit, derive=derive_key)[0]


@contextmanager
def statements_sent(store: Store) -> Iterator[tuple[list[str], list[str]]]:
    """What the block sends: (statements through SQLAlchemy, the held connections'
    prepared forms)."""
    from scanqueue.db.direct_sql import HeldConnections

    through_sqlalchemy: list[str] = []
    sent: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        through_sqlalchemy.append(statement)

    execute = HeldConnections._execute

    def spy(self: Any, cursor: Any, statement: Any, *args: Any) -> None:
        sent.append(statement.prepared.execute_sql)
        execute(self, cursor, statement, *args)

    engines = (store.engine, store._autocommit_engine.engine)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(HeldConnections, "_execute", spy)
            yield through_sqlalchemy, sent
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def start(store: Store, ids: list[str]) -> None:
    """Mark claimed scans running (what a worker's start does), so they hold slots."""
    with store.engine.begin() as conn:
        for scan_id in ids:
            conn.execute(
                text("UPDATE scans SET status='running', attempts=attempts+1 WHERE id=:i"),
                {"i": scan_id},
            )


def finish(store: Store, ids: list[str]) -> None:
    with store.engine.begin() as conn:
        for scan_id in ids:
            conn.execute(text("UPDATE scans SET status='completed' WHERE id=:i"), {"i": scan_id})


def test_claim_order_is_priority_then_age(store: Store) -> None:
    low = [add(store) for _ in range(3)]
    high = add(store, priority=5)
    neg = add(store, priority=-1)
    assert claim(store) == [high, *low, neg]


def test_run_after_in_the_future_is_not_claimed(store: Store) -> None:
    later = add(store, run_after=(datetime.now(UTC) + timedelta(seconds=1.5)).isoformat())
    now = add(store, run_after="2000-01-01T00:00:00")  # naive: UTC, long past
    assert claim(store) == [now]
    deadline = time.monotonic() + 10
    got: list[str] = []
    while not got and time.monotonic() < deadline:
        time.sleep(0.2)
        got = claim(store)
    assert got == [later]


def test_pause_all_and_one_key_persist_and_resume(store: Store, db_url: str) -> None:
    a = add(store, key="acct-a")
    b = add(store, key="acct-b")
    assert store.pause() and not store.pause()
    assert claim(store) == []
    # Another process (a restarted bridge) sees the same pauses.
    other = Store(store.database_url)
    assert [p["key"] for p in other.pauses()] == ["*"]
    other.dispose()
    store.pause("acct-a")
    assert store.resume()
    assert claim(store) == [b]
    assert store.resume("acct-a") and not store.resume("acct-a")
    assert claim(store) == [a]


def test_per_key_limit_default_and_override(store: Store) -> None:
    hot = [add(store, key="hot") for _ in range(5)]
    cold = [add(store, key="cold") for _ in range(3)]
    # Default limit 2: two of each key, and the others wait queued.
    first = claim(store, key_limit=2)
    assert first == [hot[0], hot[1], cold[0], cold[1]]
    assert claim(store, key_limit=2) == []
    start(store, first[:2])  # running still holds the slot
    assert claim(store, key_limit=2) == []
    finish(store, [hot[0]])
    assert claim(store, key_limit=2) == [hot[2]]
    store.set_limit("cold", 3)
    assert claim(store, key_limit=2) == [cold[2]]
    store.set_limit("hot", 0)  # 0: no limit for this key
    assert claim(store, key_limit=2) == hot[3:]
    store.clear_limit("hot")
    with pytest.raises(Exception, match="no limit set"):
        store.clear_limit("hot")


def test_a_blocked_hot_key_does_not_starve_the_others(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, scan_key)"
                " VALUES (:id, 'queued', '[\"aws\"]', '[]', 'hot')"
            ),
            [{"id": f"hot{i:05d}"} for i in range(5000)],
        )
    other = add(store, key="other")
    # Take them all in first (intake works in batches), then claim under limit 1.
    for _ in range(20):
        if not store.has_unseen():
            break
        claim(store, n=0 + 1, window=0)
    got = claim(store, key_limit=1)
    assert got == ["hot00000", other]


def insert_malformed(store: Store, scan_id: str, priority: int = 0) -> None:
    """A queued row another program wrote with a providers_scanned the Runner API rejects."""
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority)"
                " VALUES (:id, 'queued', '{\"not\": \"a list\"}', '[]', :p)"
            ),
            {"id": scan_id, "p": priority},
        )


def test_intake_keys_plain_sql_rows_and_fails_malformed_ones(store: Store, db_url: str) -> None:
    insert_rows(db_url, ["plain1"])
    insert_malformed(store, "bad1")
    taken: list[Intake] = []
    ids, _ = store.claim_within_window(10, 10, derive=derive_key, intake=taken)
    assert ids == ["plain1"]
    by_id = {t.scan_id: t for t in taken}
    assert by_id["plain1"].key == "aws|soc2" and by_id["plain1"].error is None
    assert by_id["bad1"].key is None and "providers_scanned" in (by_id["bad1"].error or "")
    bad = store.get("bad1")
    assert bad.status == "failed" and "providers_scanned" in (bad.error or "")
    assert store.get("plain1").key == "aws|soc2"
    # Seen once: a second pass takes nothing in again.
    again: list[Intake] = []
    store.claim_within_window(10, 10, derive=derive_key, intake=again)
    assert again == []


def test_a_scan_claimed_out_of_a_large_unseen_burst_was_taken_in_first(
    store: Store, db_url: str
) -> None:
    insert_rows(db_url, [f"old-{i:04d}" for i in range(600)])
    insert_rows(db_url, ["urgent"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE scans SET priority = 10 WHERE id = 'urgent'"))
    taken: list[Intake] = []
    ids, _ = store.claim_within_window(100, 4, derive=derive_key, intake=taken)
    assert "urgent" in ids  # priority first: not after 600 older rows' intake
    # One intake pass takes 500, oldest first; the claim took "urgent" in itself, so
    # its scan.queued (sent for every row in `taken`) goes before it can start.
    assert [t for t in taken if t.scan_id == "urgent"] == [Intake("urgent", "aws|soc2")]
    assert store.get("urgent").key == "aws|soc2"
    assert len({t.scan_id for t in taken}) == len(taken)  # each seen once


def test_a_malformed_row_out_of_a_large_unseen_burst_is_failed_not_claimed(
    store: Store, db_url: str
) -> None:
    insert_rows(db_url, [f"old-{i:04d}" for i in range(600)])
    insert_malformed(store, "bad-urgent", priority=10)
    claimed: list[str] = []
    taken: list[Intake] = []
    for _ in range(3):  # the intake reaches it on a later pass at the latest
        ids, _ = store.claim_within_window(100, 1000, derive=derive_key, intake=taken)
        claimed += ids
    assert "bad-urgent" not in claimed
    bad = store.get("bad-urgent")
    assert bad.status == "failed" and "providers_scanned" in (bad.error or "")
    assert [t.scan_id for t in taken if t.error is not None] == ["bad-urgent"]


# (scan_key, providers_scanned, frameworks_scanned) as SQL literals; whether
# PostgreSQL's one-statement intake keys the row itself (else take_in does).
_INTAKE_SHAPES: list[tuple[str, str, str, bool]] = [
    ("NULL", "'[\"aws\"]'", "'[\"soc2\"]'", True),
    ("NULL", "NULL", "'[]'", True),
    ("NULL", "'null'", '\'["b", "a"]\'', True),
    ("NULL", '\'["gcp", "aws", "Azure", "\u00e9", "z", "aws"]\'', "NULL", True),
    ("NULL", '\'["a,b", "a|c"]\'', "'[\"x\"]'", True),
    ("'team-a'", "'[\"aws\"]'", "'[]'", True),
    ("''", "'[\"aws\"]'", "'[]'", True),
    ("E'a\\tb'", "'[]'", "'[]'", True),
    ("' padded '", "'[\"aws\"]'", "'[]'", False),
    ("E'tab\\t'", "'[]'", "'[]'", False),
    ("'   '", "'[\"aws\"]'", "'[]'", False),
    ("'\u043a\u043b\u044e\u0447'", "'[]'", "'[]'", False),
    ("NULL", '\'"[\\"aws\\"]"\'', "'[]'", False),
    ("NULL", '\'{"not": "a list"}\'', "'[]'", False),
    ("NULL", "'[\"aws\", 1]'", "'[]'", False),
    ("'team-b'", "'\"aws\"'", "'[]'", False),
    ("NULL", "'[]'", "'[[\"x\"]]'", False),
]


def test_postgresql_intake_keys_in_sql_as_python_does(pg_url: str) -> None:
    """The one-statement intake derives the key exactly as derive_key does, and leaves
    the rows it cannot be sure of (malformed, or a key whose ends Python strips) to
    take_in, which keys or fails them: every row ends as the Python intake left it."""
    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        with store.engine.begin() as conn:
            for i, (key, providers, frameworks, _) in enumerate(_INTAKE_SHAPES):
                conn.execute(
                    text(
                        "INSERT INTO scans (id, status, scan_key, providers_scanned,"
                        f" frameworks_scanned) VALUES ('shape{i:02d}', 'queued', {key},"
                        f" {providers}, {frameworks})"
                    )
                )
            stored = {
                r.id: r
                for r in conn.execute(
                    text("SELECT id, scan_key, providers_scanned, frameworks_scanned FROM scans")
                )
            }
        expected: dict[str, tuple[str | None, str | None]] = {}
        for scan_id, row in stored.items():
            try:
                key = derive_key(row.scan_key, row.providers_scanned, row.frameworks_scanned)
                expected[scan_id] = (key, None)
            except Exception as exc:
                expected[scan_id] = (None, f"malformed row: {exc}")
        taken, left = store.take_in_direct()
        assert left
        in_sql = {f"shape{i:02d}" for i, shape in enumerate(_INTAKE_SHAPES) if shape[3]}
        assert {t.scan_id for t in taken} == in_sql
        for t in taken:
            assert (t.key, t.error) == expected[t.scan_id], t.scan_id
        rest: list[Intake] = []
        store.claim_within_window(100, 100, derive=derive_key, intake=rest)
        assert {t.scan_id for t in rest} == set(stored) - in_sql
        for scan_id, (key, error) in expected.items():
            scan = store.get(scan_id)
            assert (scan.key, scan.error) == (key, error), scan_id
            assert scan.status == ("failed" if error else "queued"), scan_id
    finally:
        store.dispose()


def test_a_notified_insert_is_taken_in_and_claimed_in_two_round_trips(pg_url: str) -> None:
    """PostgreSQL: a claim told of new rows (no look) keys them with one prepared
    statement and claims with another, both on the held connection."""

    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        insert_rows(pg_url, ["warm"])
        claim(store)  # prepares the statements
        insert_rows(pg_url, ["new1", "new2"])
        taken: list[Intake] = []
        with statements_sent(store) as (through_sqlalchemy, sent):
            ids, _ = store.claim_within_window(
                10, 10, derive=derive_key, intake=taken, look=False, take_in=True
            )
        assert through_sqlalchemy == []
        assert len(sent) == 2, sent
        assert sent[0].startswith("EXECUTE ") and sent[1].split("; ")[1].startswith(
            f"EXECUTE {PG_PLAIN_STATEMENT_NAME}"  # the last claim found no pause or limit
        )
        assert ids == ["new1", "new2"]
        assert [(t.scan_id, t.key) for t in taken] == [("new1", "aws|soc2"), ("new2", "aws|soc2")]
    finally:
        store.dispose()


def test_intake_on_sqlite_fails_a_run_after_that_is_not_a_time(tmp_path: Path) -> None:
    """SQLite keeps run_after as text: one no date function reads would never be due."""
    url = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(url)
    sqlite_store = store_for(normalize_database_url(url))
    with sqlite_store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, run_after)"
                " VALUES ('never', 'queued', '[\"aws\"]', '[]', 'next tuesday'),"
                " ('later', 'queued', '[\"aws\"]', '[]', '2026-12-06T10:00:00+02:00')"
            )
        )
    ids, _ = sqlite_store.claim_within_window(10, 10, derive=derive_key, intake=[])
    assert ids == ["later"]  # 08:00 UTC, long past
    never = sqlite_store.get("never")
    assert never.status == "failed"
    assert never.error == "malformed row: run_after 'next tuesday' is not a time"


def test_unique_enqueue_returns_the_queued_scan_of_the_key(store: Store) -> None:
    first = add(store, providers=["gcp", "aws"], frameworks=["soc2"], unique=True)
    row, dup = store.enqueue_request(
        validate_scan_request({"providers": ["aws", "gcp"], "frameworks": ["soc2"], "unique": True})
    )
    assert dup and row.id == first and row.key == "aws,gcp|soc2"
    store.cancel(first)
    row, dup = store.enqueue_request(
        validate_scan_request({"providers": ["aws", "gcp"], "frameworks": ["soc2"], "unique": True})
    )
    assert not dup and row.id != first


def test_concurrent_unique_enqueues_leave_one_queued_row(store: Store) -> None:
    clients = 16
    barrier = threading.Barrier(clients)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            # A store per client: its own connections, as separate processes would have.
            mine = Store(store.database_url)
            barrier.wait(10)
            row, dup = mine.enqueue_request(
                validate_scan_request({"providers": ["aws"], "key": "acct-1", "unique": True})
            )
            results.append((row.id, dup))
            mine.dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len({scan_id for scan_id, _ in results}) == 1
    assert sum(1 for _, dup in results if not dup) == 1
    assert len(store.list_scans(key="acct-1")) == 1


def test_labels_filter_and_list_newest_first(store: Store) -> None:
    a = add(store, labels={"team": "payments", "env": "prod"})
    b = add(store, labels={"team": "payments", "env": "dev"})
    add(store, labels={"team": "search"})
    assert [r.id for r in store.list_scans(labels={"team": "payments"})] == [b, a]
    assert [r.id for r in store.list_scans(labels={"team": "payments", "env": "prod"})] == [a]
    assert store.list_scans(labels={"team": "nobody"}) == []
    row = store.get(a)
    assert row.labels == {"team": "payments", "env": "prod"}
    assert "triggered_by_token" not in row.to_json()


def test_policy_fields_are_stored_and_shown(store: Store) -> None:
    scan_id = add(
        store,
        priority=7,
        key=" acct-9 ",
        run_after="2030-01-02T03:04:05+01:00",
        timeout_seconds=60,
    )
    shown = store.get(scan_id).to_json()
    assert shown["priority"] == 7
    assert shown["scan_key"] == "acct-9" and shown["key"] == "acct-9"
    assert shown["run_after"] == "2030-01-02T02:04:05.000000+00:00"
    assert shown["timeout_seconds"] == 60 and shown["retries"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"providers": ["aws"], "priority": "high"}, "priority"),
        ({"providers": ["aws"], "priority": 10**7}, "priority"),
        ({"providers": ["aws"], "timeout_seconds": 0}, "timeout_seconds"),
        ({"providers": ["aws"], "run_after": "tomorrow"}, "run_after"),
        ({"providers": ["aws"], "labels": ["x"]}, "labels"),
        ({"providers": ["aws"], "labels": {f"k{i}": "v" for i in range(17)}}, "labels"),
        ({"providers": ["aws"], "labels": {"bad key": "v"}}, "labels['bad key']"),
        ({"providers": ["aws"], "labels": {"k": 1}}, "labels['k']"),
        ({"providers": ["aws"], "key": "x" * 401}, "key"),
        ({"providers": ["aws"], "unique": "yes"}, "unique"),
    ],
)
def test_the_validator_names_the_bad_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidScanRequest) as info:
        validate_scan_request(body)
    assert [d["field"] for d in info.value.details] == [field]


def test_queue_activity_per_key(store: Store) -> None:
    ids = [add(store, key="k1") for _ in range(3)]
    store.set_limit("k1", 2)
    store.pause("k2")
    start(store, claim(store, key_limit=0))
    activity = {k["key"]: k for k in store.key_activity(0)}
    assert activity["k1"]["running"] == 2 and activity["k1"]["limit"] == 2
    assert activity["k2"]["paused"] and activity["k2"]["running"] == 0
    assert store.oldest_queued_age_s() >= 0
    assert ids


def test_store_for_is_reused(db_url: str, store: Store) -> None:
    assert store_for(store.database_url) is store


def test_the_policy_claim_is_one_round_trip_on_postgresql(pg_url: str) -> None:
    """Limits, pauses, counts, candidates and the update: one statement, sent with the
    lock in one query string (one implicit transaction), after the unlocked look."""
    from scanqueue.config import normalize_database_url
    from tests.conftest import upgrade

    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        for i in range(6):
            add(store, key=f"k{i % 3}")
        store.set_limit("k0", 1)
        store.pause("k2")
        claim(store, n=1, window=10, key_limit=2)  # prepares the statements
        with statements_sent(store) as (through_sqlalchemy, sent):
            got = claim(store, n=10, window=10, key_limit=2)
        assert through_sqlalchemy == []
        assert len(sent) == 2, sent  # the look, then the lock and the claim
        assert sent[0].startswith("EXECUTE ")
        lock, claim_sql = sent[1].split("; ")
        assert "pg_advisory_xact_lock" in lock
        assert claim_sql.startswith(f"EXECUTE {PG_STATEMENT_NAME}")
        assert [store.get(i).key for i in got] == ["k1", "k1"]  # k0 full, k2 paused
    finally:
        store.dispose()


def test_the_plain_claim_gives_way_to_a_pause_or_limit_set_since(pg_url: str) -> None:
    """PostgreSQL: while the last claim found no pause or limit, the claim is the plain
    statement; one set since makes it claim nothing, and the whole statement then runs
    in the same call and obeys it (and stays until the policies are gone)."""
    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        add(store, key="warm")
        claim(store)  # no policy: the next claim may be plain
        hot = [add(store, key="hot") for _ in range(3)]
        cold = add(store, key="cold")
        store.pause("cold")
        store.set_limit("hot", 1)
        with statements_sent(store) as (_, sent):
            got = store.claim_within_window(10, 10, look=False)[0]
        claims = [s.split("; ")[1] for s in sent]
        assert [c.split(" ")[1] for c in claims] == [PG_PLAIN_STATEMENT_NAME, PG_STATEMENT_NAME]
        assert got == [hot[0]]  # cold paused, hot at its limit
        with statements_sent(store) as (_, sent):
            assert store.claim_within_window(10, 10, look=False)[0] == []
        assert [s.split("; ")[1].split(" ")[1] for s in sent] == [PG_STATEMENT_NAME]
        store.resume("cold")
        store.clear_limit("hot")
        assert sorted(store.claim_within_window(10, 10, look=False)[0]) == sorted([*hot[1:], cold])
        with statements_sent(store) as (_, sent):
            store.claim_within_window(10, 10, look=False)
        assert [s.split("; ")[1].split(" ")[1] for s in sent] == [PG_PLAIN_STATEMENT_NAME]
    finally:
        store.dispose()


def test_the_one_trip_claim_commits_without_waiting_for_its_flush(pg_url: str) -> None:
    """PostgreSQL: the claim's own transaction commits with synchronous_commit off
    (the start's durable compare-and-set stands behind it); the held connection's
    later statements (the intake, the starts of an embedded worker's successors) keep
    the server's setting."""
    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        add(store)
        with statements_sent(store) as (_, sent):
            assert len(store.claim_within_window(10, 10, look=False)[0]) == 1
        assert "set_config('synchronous_commit', 'off', true)" in sent[0].split("; ")[0]
        assert store._direct is not None
        cur = store._direct._connection().cursor()
        try:
            cur.execute("SHOW synchronous_commit")
            assert cur.fetchone()[0] == "on"
        finally:
            cur.close()
    finally:
        store.dispose()


def test_the_plain_claim_reads_only_what_it_claims(pg_url: str) -> None:
    """PostgreSQL, no pause or limit, 10**5 queued rows: the plain claim reads the head
    of the claim order and the window, not the backlog (its plan made on an empty table,
    as on a new database)."""
    upgrade(pg_url)
    store = Store(normalize_database_url(pg_url))
    try:
        claim(store)
        claim(store)  # plain, prepared on the empty table
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                    " priority, effective_key, seen_at) SELECT 's' || i, 'queued', '[]', '[]',"
                    " (i % 4) * 10, 'k' || (i % 20), now() FROM generate_series(0, 99999) i"
                )
            )
        assert len(claim(store, n=4, window=8)) == 4
        values = {"key_limit": 0, "limit": 4, "window": 8, "cap": 4, "m": fast_rows(4)}
        examined = _pg_rows_examined(store, values, PG_PLAIN_STATEMENT_NAME)
        assert examined < 40, examined
    finally:
        store.dispose()


@pytest.fixture
def every_key_full(store: Store) -> Iterator[Store]:
    """10**5 queued scans over 20 keys, each key with one scan dispatched: at limit 1,
    every key with queued scans is full.  The claim ran once on the empty table first,
    so on PostgreSQL its plan was made without statistics, as on a new database."""
    assert claim(store, n=100, window=1000, key_limit=1) == []
    n = 100_000
    rows = (
        f"generate_series(0, {n - 1}) AS g(i)"
        if store.dialect == "postgresql"
        else f"(WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < {n - 1})"
        " SELECT i FROM g)"
    )
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                f" priority, effective_key, seen_at) SELECT 's' || i, 'queued', '[]', '[]',"
                f" (i % 4) * 10, 'k' || (i % 20), '2020-01-01 00:00:00' FROM {rows}"
            )
        )
    assert len(claim(store, n=100, window=1000, key_limit=1)) == 20
    yield store


def test_the_claim_stays_flat_when_every_key_is_full(every_key_full: Store) -> None:
    """Blocked keys hold every queued row: the claim must not walk the 10**5 of them."""
    store = every_key_full
    assert claim(store, n=100, window=1000, key_limit=1) == []
    values = {"key_limit": 1, "limit": 100, "window": 1000, "cap": 100, "m": fast_rows(100)}
    if store.dialect == "postgresql":
        examined = _pg_rows_examined(store, values)
    else:
        examined = _sqlite_vm_steps(store, values)
    # The first :m rows are all of full keys; the loose scan of the (few) keys reads
    # one entry per key; nothing per key is read, since none has room.  Walking the
    # backlog would examine 100,000 rows (PostgreSQL) or about 1.6 million VM steps
    # (SQLite).
    bound = 2 * fast_rows(100) if store.dialect == "postgresql" else 150_000
    assert examined < bound, examined


def test_sqlite_claims_on_a_schema_without_the_key_index(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Code newer than the schema (deployed before ``db upgrade``): slower, not stopped."""
    from scanqueue.db.migrate import upgrade

    store = Store(sqlite_url)
    try:
        upgrade(store, "0009")
        hot = [add(store, key="hot") for _ in range(3)]
        other = add(store, key="other")
        with caplog.at_level("WARNING", logger="scanqueue.db.claims"):
            assert claim(store, key_limit=1) == [hot[0], other]
        assert "scanqueue db upgrade" in caplog.text
        store.release_dispatch([hot[0], other])
        assert claim(store, key_limit=1) == [hot[0], other]  # warned once
        assert caplog.text.count("scanqueue db upgrade") == 1
    finally:
        store.dispose()


def test_sqlite_claims_and_releases_look_ids_up_by_key(every_key_full: Store) -> None:
    """Updating a few claimed or released rows must not read the 10**5 queued ones (with
    a status term SQLite would go through its (status, created_at) index instead)."""
    store = every_key_full
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL's plan is checked by the rows it reads")
    held = store.claim_within_window(100, 1000, key_limit=2)[0]  # a second scan of each key
    assert len(held) == 20
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    def count(dbapi_conn: Any, *_: Any) -> None:
        dbapi_conn.set_progress_handler(tick, 1)

    for engine in (store.engine, store._autocommit_engine.engine):
        event.listen(engine, "checkout", count)
    store.release_dispatch(held)
    assert store.claim_within_window(100, 1000, key_limit=2)[0] == held
    assert len(store.claim_for_dispatch(3)) == 3  # the claim without a window
    # About 200,000 steps; reading the queued rows would take over a million.
    assert steps[0] < 400_000, steps[0]


def test_a_deep_key_ahead_of_many_keys_is_walked_past(store: Store) -> None:
    """A key with room for one more holds the 500 first rows, 3,000 keys of one scan
    each come after it: the claim takes its one row and walks past the rest to the
    others, without reading every key."""
    with store.engine.begin() as conn:
        for prefix, count, priority, key in (("h", 501, 10, "'hot'"), ("k", 3000, 0, "'key' || i")):
            rows = (
                f"generate_series(0, {count - 1}) AS g(i)"
                if store.dialect == "postgresql"
                else f"(WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g"
                f" WHERE i < {count - 1}) SELECT i FROM g)"
            )
            conn.execute(
                text(
                    "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                    f" priority, effective_key, seen_at) SELECT '{prefix}' || i, 'queued', '[]',"
                    f" '[]', {priority}, {key}, '2020-01-01 00:00:00' FROM {rows}"
                )
            )
        others = [
            r.id
            for r in conn.execute(
                text(
                    "SELECT id FROM scans WHERE effective_key <> 'hot'"
                    " ORDER BY priority DESC, created_at, id LIMIT 49"
                )
            )
        ]
    assert claim(store, n=1, window=1000, key_limit=2) == ["h0"]  # hot: room for one more
    values = {"key_limit": 2, "limit": 50, "window": 1000, "cap": 50, "m": fast_rows(50)}
    if store.dialect == "postgresql":
        examined = _pg_rows_examined(store, values)
        bound = 2_500  # reading every key: over 6,000 (3,000 keys, then a row of each)
    else:
        examined = _sqlite_vm_steps(store, values)
        bound = 400_000
    assert examined < bound, examined
    got = claim(store, n=50, window=1000, key_limit=2)
    assert got == ["h1", *others]


def _pg_rows_examined(store: Store, values: dict[str, int], name: str = PG_STATEMENT_NAME) -> int:
    """Rows of ``scans`` the prepared claim reads (returned or filtered out), per EXPLAIN,
    with the plan the store's connection made when it first claimed (this thread's held
    connection, where the claim runs)."""
    assert store._direct is not None
    cur = store._direct._connection().cursor()
    try:
        cur.execute("SELECT 1 FROM pg_prepared_statements WHERE name = %s", (name,))
        assert cur.fetchone() is not None
        cur.execute("BEGIN")
        for setting, value in PG_PLANNER_SETTINGS:
            cur.execute("SELECT set_config(%s, %s, true)", (setting, value))
        args = ", ".join(str(values[k]) for k in ("key_limit", "limit", "window", "cap", "m"))
        cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name} ({args})")
        plan = cur.fetchone()[0]
    finally:
        cur.execute("ROLLBACK")
        cur.close()

    def rows(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "scans":
            loops = node.get("Actual Loops", 0)
            own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
        return own + sum(rows(child) for child in node.get("Plans", []))

    return rows(plan[0]["Plan"])


def _sqlite_vm_steps(store: Store, values: dict[str, int]) -> int:
    """SQLite virtual-machine instructions the claim's SELECT runs (a progress handler)."""
    conn = sqlite3.connect(store.database_url.removeprefix("sqlite:///"))
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    try:
        conn.set_progress_handler(tick, 1)
        sql = re.sub(r"(?<!:):(\w+)", r":\1", policy_claim_sql("sqlite"))
        conn.execute(sql, values).fetchall()
    finally:
        conn.close()
    return steps[0]
