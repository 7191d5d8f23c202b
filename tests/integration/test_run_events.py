"""A run's own events written by its start and finish statements (PostgreSQL with the
events table; scanqueue.db.run_events): the same events as the sender writes, in the
run's order, never stalling a run, never skipped by a reader, pruned."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from scanqueue.config import Settings, normalize_database_url
from scanqueue.db.run_events import StatementEvents
from scanqueue.db.store import Store, store_for
from scanqueue.observe.event_sender import EventObserver, background_emitter_for
from scanqueue.observe.event_sinks import TableEventSink, build_event_sink
from scanqueue.observe.observer import SafeObservers
from scanqueue.runners.api import Job, RunnerFunc, ScanContext, ScanResult
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from scanqueue.worker.runtime import statement_events
from tests.claimed import mark_dispatched
from tests.conftest import upgrade
from tests.runners import failing_runner, progress_runner

pytestmark = [pytest.mark.postgres]

BASE = ExecutionSettings(heartbeat_every_s=1, lease_s=30, cancel_grace_s=5)


@pytest.fixture
def store(pg_url: str) -> Store:
    upgrade(pg_url)
    return store_for(normalize_database_url(pg_url))


@pytest.fixture
def sink(store: Store) -> Iterator[TableEventSink]:
    table = TableEventSink(store, maxlen=1000)
    yield table
    background_emitter_for(table).flush(10)


def events_of(sink: TableEventSink) -> StatementEvents:
    return StatementEvents(sink.PG_LOCK_KEY, sink.maxlen, sink.prune_every)


def run(
    store: Store,
    sink: TableEventSink,
    runner: Any,
    *,
    in_statements: bool,
    providers: list[str] | None = None,
) -> tuple[str, Outcome]:
    row = store.enqueue(providers or ["aws", "gcp"], ["soc2"], user="u", token="tok-SECRET")
    mark_dispatched(store, row.id)
    settings = BASE
    if in_statements:
        settings = ExecutionSettings(
            heartbeat_every_s=1, lease_s=30, cancel_grace_s=5, statement_events=events_of(sink)
        )
    outcome = execute_scan(
        row.id,
        store=store,
        runner=RunnerFunc(runner),
        settings=settings,
        observer=SafeObservers([EventObserver(sink)]),
    )
    assert background_emitter_for(sink).flush(10)
    return row.id, outcome


def stored(store: Store, scan_id: str) -> list[dict[str, Any]]:
    with store.engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT id, type, at, payload FROM scanqueue_events WHERE scan_id = :s ORDER BY id"
            ),
            {"s": scan_id},
        ).all()
    return [{"id": r.id, "type": r.type, "at": r.at, **r.payload} for r in rows]


def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without what differs between two runs (ids, times, durations)."""
    return [{k: v for k, v in e.items() if k not in ("id", "at", "duration_s")} for e in events]


@pytest.mark.parametrize("runner", [progress_runner, failing_runner])
def test_the_statements_write_the_events_the_sender_would(
    store: Store, sink: TableEventSink, runner: Any
) -> None:
    by_sender, outcome = run(store, sink, runner, in_statements=False)
    by_statements, outcome2 = run(store, sink, runner, in_statements=True)
    assert outcome == outcome2
    old, new = stored(store, by_sender), stored(store, by_statements)
    assert comparable(old) == comparable(new)
    assert new[0]["type"] == "scan.started"
    assert new[-1]["type"] in ("scan.completed", "scan.failed")
    assert all(isinstance(e["duration_s"], float) for e in new[-1:])
    row = store.get(by_statements)
    # The events' times are the row's: its start, and its finish.
    assert new[0]["at"] == row.started_at and new[-1]["at"] == row.finished_at
    assert "tok-SECRET" not in str(new)
    # What a subscriber reads: the contract fields and the payload, as from the sender.
    read = {e.id: e.data for e in sink.read_after(None, 100)}
    assert read[str(new[0]["id"])]["providers"] == ["aws", "gcp"]
    assert set(read[str(new[-1]["id"])]) == set(read[str(old[-1]["id"])])


def test_the_started_and_finished_rows_carry_the_event_ids(
    store: Store, sink: TableEventSink
) -> None:
    row = store.enqueue(["aws"], [])
    mark_dispatched(store, row.id)
    started = store.start_run(row.id, "w", events=events_of(sink))
    assert started is not None and started.event_id is not None
    finished = store.finish_run_with_event(
        row.id, 1, "completed", findings_count=1, events=events_of(sink), duration_s=0.25
    )
    assert finished is not None and finished.event_id is not None
    assert int(finished.event_id) > int(started.event_id)
    (end,) = [e for e in stored(store, row.id) if e["type"] == "scan.completed"]
    assert end["duration_s"] == 0.25 and end["findings_count"] == 1
    assert end["findings_new"] is None and end["findings_fixed"] is None


def test_queued_events_of_the_run_are_written_before_its_finish(
    store: Store, sink: TableEventSink
) -> None:
    """The sender holds progress events back (a long linger): the finish waits for them."""
    emitter = background_emitter_for(sink)
    emitter.linger_s = 0.3
    try:
        scan_id, outcome = run(store, sink, progress_runner, in_statements=True)
    finally:
        emitter.linger_s = 0.005
    assert outcome is Outcome.COMPLETED
    assert [e["type"] for e in stored(store, scan_id)] == [
        "scan.started",
        "scan.progress",
        "scan.finding",
        "scan.finding",
        "scan.progress",
        "scan.completed",
    ]


def test_a_row_whose_lists_are_not_arrays_gets_its_started_event_from_the_sender(
    store: Store, sink: TableEventSink
) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned,"
                " dispatched_at) VALUES ('odd', 'queued', '\"[\\\"aws\\\"]\"', NULL, now())"
            )
        )
    started = store.start_run("odd", "w", events=events_of(sink))
    assert started is not None and started.event_id is None  # left to the sender


def test_a_held_event_lock_stalls_a_run_at_most_the_lock_wait(
    store: Store, sink: TableEventSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer holds the events' lock (a frozen one, say) for 2.5 s: the start
    waits LOCK_WAIT (1 s), then starts without its event, which the sender writes once
    the lock is free; the finish waits for it (at most 2 s), keeping the order."""
    holder = store.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": sink.PG_LOCK_KEY})
    threading.Timer(2.5, tx.rollback).start()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="scanqueue.db.runs"):
            scan_id, outcome = run(
                store, sink, lambda job, ctx: ScanResult(findings_count=0), in_statements=True
            )
        took = time.monotonic() - t0
    finally:
        time.sleep(2.7)
        holder.close()
    assert outcome is Outcome.COMPLETED and store.get(scan_id).status == "completed"
    assert 1.0 <= took < 4.5
    assert "scan.started goes by the sender" in caplog.text
    assert [e["type"] for e in stored(store, scan_id)] == ["scan.started", "scan.completed"]


def test_a_briefly_held_event_lock_is_waited_for(store: Store, sink: TableEventSink) -> None:
    """Held for 0.3 s (a batch being written): the statements wait and write the events."""
    holder = store.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": sink.PG_LOCK_KEY})
    threading.Timer(0.3, tx.rollback).start()
    try:
        row = store.enqueue(["aws"], [])
        mark_dispatched(store, row.id)
        started = store.start_run(row.id, "w", events=events_of(sink))
    finally:
        time.sleep(0.5)
        holder.close()
    assert started is not None and started.event_id is not None


def test_a_reader_following_by_id_never_misses_an_event_from_a_statement(
    store: Store, sink: TableEventSink
) -> None:
    """Runs on several threads write events by statement and by sender at once, while a
    reader follows the table by id: it sees every event, once, in id order."""
    start = sink.last_id()
    threads, per_thread = 4, 15
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        cursor: str | None = start
        while not stop.is_set():
            batch = sink.read_after(cursor, 100)
            seen.extend(e.id for e in batch)
            if batch:
                cursor = batch[-1].id

    def work() -> None:
        for _ in range(per_thread):
            run(store, sink, progress_runner, in_statements=True)

    reader = threading.Thread(target=follow)
    reader.start()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    time.sleep(0.5)
    stop.set()
    reader.join(10)
    every = [e.id for e in sink.read_after(start, 10_000)]
    assert len(every) == threads * per_thread * 6
    assert seen == every


def test_the_statements_prune_the_table_like_the_sink(store: Store) -> None:
    small = TableEventSink(store, maxlen=20)
    events = events_of(small)
    assert events.prune_every == 2
    for _ in range(30):
        row = store.enqueue(["aws"], [])
        mark_dispatched(store, row.id)
        assert store.start_run(row.id, "w", events=events) is not None
        store.finish_run_with_event(row.id, 1, "completed", events=events)
    with store.engine.begin() as conn:
        count, newest = conn.execute(text("SELECT count(*), max(id) FROM scanqueue_events")).one()
    assert newest == 60 and count <= 21


def test_only_postgresql_with_the_events_table_writes_events_in_statements(
    store: Store, redis_url: str, tmp_path: Any
) -> None:
    url = store.database_url
    table = Settings.from_env({"DATABASE_URL": url})
    found = statement_events(table, store)
    sink = build_event_sink(table)
    assert isinstance(sink, TableEventSink)
    assert found == StatementEvents(sink.PG_LOCK_KEY, sink.maxlen, sink.prune_every)
    with_redis = Settings.from_env({"DATABASE_URL": url, "REDIS_URL": redis_url})
    assert statement_events(with_redis, store) is None  # events go to the stream
    sqlite_url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(sqlite_url)
    sqlite = Settings.from_env({"DATABASE_URL": sqlite_url})
    assert statement_events(sqlite, store_for(sqlite_url)) is None  # SQLite keeps the sender


def test_a_swap_writes_the_started_event_of_the_scan_it_started(
    store: Store, sink: TableEventSink
) -> None:
    low, high = store.enqueue(["aws"], []), store.enqueue(["gcp"], [])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE scans SET priority = 5 WHERE id = :id"), {"id": high.id})
    mark_dispatched(store, low.id, high.id)
    seen: list[str] = []

    def fn(job: Job, ctx: ScanContext) -> None:
        seen.append(job.scan_id)

    settings = ExecutionSettings(
        heartbeat_every_s=1, lease_s=30, cancel_grace_s=5, statement_events=events_of(sink)
    )
    observer = SafeObservers([EventObserver(sink)])
    assert execute_scan(
        low.id, store=store, runner=RunnerFunc(fn), settings=settings, observer=observer
    ) is Outcome.COMPLETED  # fmt: skip
    assert seen == [high.id]
    assert [e["type"] for e in stored(store, high.id)] == ["scan.started", "scan.completed"]
    assert stored(store, high.id)[0]["providers"] == ["gcp"]
    assert stored(store, low.id) == []


@pytest.mark.slow
@pytest.mark.redis
def test_a_real_worker_writes_each_runs_events_complete_and_in_order(
    pg_url: str, redis_url: str, tmp_path: Any, procs: list[Any]
) -> None:
    """PostgreSQL without REDIS_URL (Redis only as the broker): the pool processes'
    statements write scan.started and scan.completed, a reader following by id sees
    every event once, and each scan's events are in its order."""
    from tests.conftest import base_env, start_worker, wait_for

    upgrade(pg_url)
    url = normalize_database_url(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        CELERY_BROKER_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:progress_runner",
    )
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    sink = build_event_sink(Settings.from_env({"DATABASE_URL": url}))
    start = sink.last_id()
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        cursor: str | None = start
        while not stop.is_set():
            batch = sink.read_after(cursor, 500)
            seen.extend(e.id for e in batch)
            if batch:
                cursor = batch[-1].id
            time.sleep(0.01)

    reader = threading.Thread(target=follow)
    reader.start()
    store = store_for(url)
    ids = [store.enqueue(["aws"], ["soc2"]).id for _ in range(60)]
    try:
        wait_for(lambda: all(store.get(i).status == "completed" for i in ids), 60, what="all done")
        time.sleep(0.5)
    finally:
        stop.set()
        reader.join(10)
    every = sink.read_after(start, 10_000)
    assert seen == [e.id for e in every]
    expected = ["scan.started", "scan.progress", "scan.finding", "scan.progress", "scan.completed"]
    by_scan: dict[str, list[Any]] = {}
    for event in every:
        if event.type != "scan.queued":
            by_scan.setdefault(event.scan_id, []).append(event)
    assert {i: [e.type for e in by_scan[i]] for i in ids} == {i: expected for i in ids}
    # Written by the statements (their time is the row's start), not the sender's.
    by_statement = sum(
        by_scan[i][0].data["at"] == store.get(i).to_json()["started_at"] for i in ids
    )
    print(f"\nMEASURED scan.started written by the start statement: {by_statement} of 60")
    assert by_statement == 60
