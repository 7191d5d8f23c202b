"""The event log: Redis stream and table sinks, the observer, and failure isolation."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from scanqueue.config import Settings, normalize_database_url
from scanqueue.db.redisconn import redis_client
from scanqueue.db.rows import FinishedRun
from scanqueue.db.store import store_for
from scanqueue.observe import event_sender
from scanqueue.observe.event_sender import (
    BackgroundEmitter,
    EventObserver,
    background_emitter_for,
    emit_standalone,
    flush_pending_events,
)
from scanqueue.observe.event_sinks import (
    RedisEventSink,
    TableEventSink,
    build_event_sink,
    event_sink_for,
)
from scanqueue.observe.events import EventSink, event_fields
from scanqueue.observe.observer import RunInfo, SafeObservers
from scanqueue.runners.api import RunnerFunc
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from tests.claimed import mark_dispatched
from tests.conftest import base_env, free_port, run_cli, upgrade
from tests.runners import progress_runner


def _settings(db_url: str, redis_url: str | None = None) -> Settings:
    env = {"DATABASE_URL": db_url, "SCANQUEUE_QUEUE": f"q{time.monotonic_ns()}"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return Settings.from_env(env)


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventSink]:
    """A fresh sink of each kind."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        yield build_event_sink(_settings(f"sqlite:///{tmp_path / 'x.db'}", url), maxlen=1000)
        return
    db_url = (
        f"sqlite:///{tmp_path / 'scans.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    upgrade(db_url)
    yield build_event_sink(_settings(normalize_database_url(db_url)), maxlen=1000)


def test_events_are_ordered_resumable_and_carry_the_contract_fields(sink: EventSink) -> None:
    assert sink.last_id() == sink.zero_id
    assert sink.read_after(None, 10) == []
    ids = [
        sink.emit("scan.started", "s1", {"attempt": 1, "providers": ["aws"]}),
        sink.emit("scan.progress", "s1", {"attempt": 1, "percent": 50, "message": "half"}),
        sink.emit("scan.finding", "s1", {"attempt": 1, "check_id": "c1", "type": "misconfig"}),
        sink.emit("scan.completed", "s1", {"attempt": 1, "findings_count": 1}),
    ]
    keys = [sink.sort_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 4
    assert sink.last_id() == ids[-1]

    everything = sink.read_after(None, 100)
    assert [e.id for e in everything] == ids
    assert [e.type for e in everything] == [
        "scan.started",
        "scan.progress",
        "scan.finding",
        "scan.completed",
    ]
    first = everything[0].data
    assert first["id"] == ids[0] and first["scan_id"] == "s1" and first["attempt"] == 1
    assert first["providers"] == ["aws"]
    at = datetime.fromisoformat(first["at"])
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert everything[1].data["percent"] == 50
    # A payload field named like a reserved key is kept, not allowed to overwrite it.
    assert everything[2].data["type"] == "scan.finding"
    assert everything[2].data["payload_type"] == "misconfig"

    assert [e.id for e in sink.read_after(ids[1], 100)] == ids[2:]  # strictly after
    assert [e.id for e in sink.read_after(ids[0], 2)] == ids[1:3]
    assert sink.read_after(ids[-1], 100) == []
    with pytest.raises(ValueError):
        sink.sort_key("not-an-id")


def test_the_token_never_reaches_an_event(sink: EventSink) -> None:
    sink.emit("scan.progress", "s1", {"triggered_by_token": "sekrit", "token": "sekrit", "x": 1})
    (event,) = sink.read_after(None, 10)
    assert "sekrit" not in event.to_json()
    assert event.data["x"] == 1


def test_values_that_are_not_json_are_stored_as_text(sink: EventSink) -> None:
    sink.emit("scan.finding", "s1", {"path": Path("/etc/passwd"), "when": datetime(2026, 1, 1)})
    (event,) = sink.read_after(None, 10)
    assert event.data["path"] == "/etc/passwd"
    assert event.data["when"].startswith("2026-01-01")


def test_wait_after_wakes_up_when_an_event_arrives(sink: EventSink) -> None:
    start = sink.last_id()
    assert sink.wait_after(start, 10, 0.3) == []  # times out empty
    emitted_at: list[float] = []

    def later() -> None:
        time.sleep(0.3)
        emitted_at.append(time.monotonic())
        sink.emit("scan.progress", "s1", {"n": 1})

    t = threading.Thread(target=later)
    t.start()
    found = sink.wait_after(start, 10, 5.0)
    latency = time.monotonic() - emitted_at[0]
    t.join()
    assert [e.data["n"] for e in found] == [1]
    assert latency < 0.5, f"woke {latency:.3f}s after the event"


def test_concurrent_writers_never_leave_a_reader_behind(sink: EventSink) -> None:
    """A reader that follows the log by id sees every event exactly once, even while
    several writers commit concurrently (on PostgreSQL, ids are taken in commit order)."""
    writers, per_writer = 6, 40
    total = writers * per_writer
    seen: list[str] = []
    done = threading.Event()

    def write(w: int) -> None:
        for i in range(per_writer):
            sink.emit("scan.progress", f"s{w}", {"i": i})

    start = sink.last_id()  # before any writer runs

    def read() -> None:
        cursor: str | None = start
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            batch = sink.read_after(cursor, 50)
            if batch:
                seen.extend(e.id for e in batch)
                cursor = batch[-1].id
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join(70)
    assert done.is_set()
    assert len(seen) == total and len(set(seen)) == total
    assert [e.id for e in sink.read_after(None, total + 10)] == seen
    # Each writer's events are in its own order.
    per_scan: dict[str, list[int]] = {}
    for e in sink.read_after(None, total + 10):
        per_scan.setdefault(e.scan_id, []).append(e.data["i"])
    assert all(v == list(range(per_writer)) for v in per_scan.values())


def test_table_retention_prunes_the_oldest(db_url: str) -> None:
    upgrade(db_url)
    sink = TableEventSink(store_for(normalize_database_url(db_url)), maxlen=20)
    ids = [sink.emit("scan.progress", "s", {"i": i}) for i in range(65)]
    kept = sink.read_after(None, 1000)
    assert 20 <= len(kept) <= 22
    assert kept[-1].id == ids[-1]
    assert [e.data["i"] for e in kept] == list(range(65 - len(kept), 65))


def _fields(i: int, scan_id: str = "s") -> dict[str, Any]:
    return event_fields("scan.progress", scan_id, {"i": i})


def test_a_batch_is_written_in_order_and_continues_the_ids(sink: EventSink) -> None:
    assert sink.write_batch([]) == []
    first = sink.emit("scan.started", "s", {"attempt": 1})
    batch = [_fields(i) for i in range(50)]
    ids = sink.write_batch(batch)
    last = sink.emit("scan.completed", "s", {"attempt": 1})
    keys = [sink.sort_key(i) for i in [first, *ids, last]]
    assert keys == sorted(keys) and len(set(keys)) == 52
    got = sink.read_after(None, 100)
    assert [e.id for e in got] == [first, *ids, last]
    assert [e.data["i"] for e in got[1:-1]] == list(range(50))
    assert all(e.type == "scan.progress" and e.scan_id == "s" for e in got[1:-1])
    # ``at`` is the one in the fields (when it happened), not when the batch was written.
    stored_at = [datetime.fromisoformat(e.data["at"]) for e in got[1:-1]]
    assert stored_at == [datetime.fromisoformat(f["at"]) for f in batch]
    assert batch[0]["type"] == "scan.progress" and "at" in batch[0]  # the caller's, unchanged
    assert [e.id for e in sink.read_after(ids[24], 100)] == [*ids[25:], last]


def test_table_retention_prunes_the_oldest_with_batches(db_url: str) -> None:
    upgrade(db_url)
    sink = TableEventSink(store_for(normalize_database_url(db_url)), maxlen=20)
    for start in range(0, 65, 7):
        sink.write_batch([_fields(i) for i in range(start, min(start + 7, 65))])
    kept = sink.read_after(None, 1000)
    assert 20 <= len(kept) <= 27
    assert [e.data["i"] for e in kept] == list(range(65 - len(kept), 65))


def test_redis_stream_is_capped_and_keyed_by_queue(redis_url: str, tmp_path: Path) -> None:
    settings = _settings(f"sqlite:///{tmp_path / 'x.db'}", redis_url)
    sink = build_event_sink(settings, maxlen=50)
    assert isinstance(sink, RedisEventSink)
    assert sink.key == f"scanqueue:{settings.queue}:events"
    for i in range(1000):
        sink.emit("scan.progress", "s", {"i": i})
    length = int(redis_client(redis_url).xlen(sink.key))
    assert 50 <= length < 250  # MAXLEN ~ trims whole nodes
    assert sink.read_after(None, 1000)[-1].data["i"] == 999


def test_maxlen_comes_from_the_environment(tmp_path: Path) -> None:
    from scanqueue.config import DEFAULT_EVENTS_MAXLEN, Settings
    from scanqueue.errors import ConfigError

    assert Settings.from_env({}).events_maxlen == DEFAULT_EVENTS_MAXLEN
    settings = Settings.from_env(
        {"SCANQUEUE_EVENTS_MAXLEN": "500", "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    )
    assert build_event_sink(settings).maxlen == 500  # type: ignore[attr-defined]
    for bad in ("0", "lots"):
        with pytest.raises(ConfigError, match="SCANQUEUE_EVENTS_MAXLEN"):
            Settings.from_env({"SCANQUEUE_EVENTS_MAXLEN": bad})


def test_sink_choice_and_per_process_cache(redis_url: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'scans.db'}"
    upgrade(db)
    with_redis, without = _settings(db, redis_url), _settings(db)
    assert isinstance(event_sink_for(with_redis), RedisEventSink)
    assert isinstance(event_sink_for(without), TableEventSink)
    assert event_sink_for(without) is event_sink_for(without)


# -- the observer ----------------------------------------------------------------------------


def _row(status: str, error: str | None = None) -> FinishedRun:
    return FinishedRun(status, None, error, 2)


def test_observer_turns_a_run_into_events(sink: EventSink) -> None:
    observer = EventObserver(sink)
    run = RunInfo("s1", 1, ["aws"], ["soc2"])
    observer.started(run)
    observer.event(run, "scan.progress", {"percent": 10})
    observer.event(run, "scan.finding", {"check_id": "c1", "attempt": 99})
    observer.finished(run, _row("completed"), 1.5)
    observer.finished(run, _row("failed", "boom"), 1.5)
    observer.finished(run, _row("canceled", "canceled by request"), 1.5)
    observer.discarded(run, 1.5)  # the canceler emits scan.canceled, not the worker
    assert observer.flush(10)
    got = [e.data for e in sink.read_after(None, 100)]
    assert [e["type"] for e in got] == [
        "scan.started",
        "scan.progress",
        "scan.finding",
        "scan.completed",
        "scan.failed",
        "scan.canceled",
    ]
    assert all(e["attempt"] == 1 and e["scan_id"] == "s1" for e in got)
    assert got[0]["providers"] == ["aws"] and got[0]["frameworks"] == ["soc2"]
    assert got[3]["findings_count"] == 2 and got[3]["duration_s"] == 1.5
    assert got[4]["error"] == "boom"
    assert got[5]["reason"] == "canceled by request"


def _dead_redis_sink(tmp_path: Path) -> EventSink:
    return build_event_sink(
        _settings(f"sqlite:///{tmp_path / 'x.db'}", f"redis://127.0.0.1:{free_port()}/0")
    )


def test_a_broken_sink_never_fails_a_scan(store: Any, tmp_path: Path) -> None:
    observer = SafeObservers([EventObserver(_dead_redis_sink(tmp_path))])
    row = store.enqueue(["aws", "gcp"], ["soc2"])
    mark_dispatched(store, row.id)
    before = event_sender.emit_failures
    started = time.monotonic()
    outcome = execute_scan(
        row.id,
        store=store,
        runner=RunnerFunc(progress_runner),
        settings=ExecutionSettings(heartbeat_every_s=1, lease_s=30, cancel_grace_s=5),
        observer=observer,
    )
    elapsed = time.monotonic() - started
    assert outcome is Outcome.COMPLETED
    assert store.get(row.id).status == "completed"
    assert elapsed < 5
    assert flush_pending_events(10)
    # started, progress ×2, finding ×2, completed: every one dropped and counted.
    assert event_sender.emit_failures - before == 6


def test_emit_standalone_never_raises(tmp_path: Path) -> None:
    settings = _settings(f"sqlite:///{tmp_path / 'x.db'}", f"redis://127.0.0.1:{free_port()}/0")
    assert emit_standalone(settings, "scan.canceled", "s1", {"reason": "x"}) is None
    no_table = _settings(f"sqlite:///{tmp_path / 'empty.db'}")  # no schema: the insert fails
    assert emit_standalone(no_table, "scan.canceled", "s1", {"reason": "x"}) is None


def test_a_real_run_emits_its_events_in_order(store: Any) -> None:
    sink = TableEventSink(store, maxlen=1000)
    row = store.enqueue(["aws", "gcp"], ["soc2"])
    mark_dispatched(store, row.id)
    execute_scan(
        row.id,
        store=store,
        runner=RunnerFunc(progress_runner),
        settings=ExecutionSettings(heartbeat_every_s=1, lease_s=30, cancel_grace_s=5),
        observer=SafeObservers([EventObserver(sink)]),
    )
    assert flush_pending_events(10)  # what the pool process's exit path calls
    got = [e.data for e in sink.read_after(None, 100)]
    assert [e["type"] for e in got] == [
        "scan.started",
        "scan.progress",
        "scan.finding",
        "scan.finding",
        "scan.progress",
        "scan.completed",
    ]
    assert [e["resource"] for e in got if e["type"] == "scan.finding"] == ["aws", "gcp"]
    assert got[-1]["findings_count"] == 2


def test_cli_cancel_emits_scan_canceled(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    store = store_for(normalize_database_url(sqlite_url))
    row = store.enqueue(["aws"], [])
    env = base_env(sqlite_url, tmp_path)
    result = run_cli(env, "cancel", row.id, "--json")
    assert result.returncode == 0, result.stderr
    sink = TableEventSink(store, maxlen=1000)
    (event,) = sink.read_after(None, 10)
    assert event.type == "scan.canceled" and event.scan_id == row.id
    assert event.data["reason"] == "canceled by request"


# -- writing in the background ---------------------------------------------------------------


class _Gated:
    """A sink whose batches wait for ``opened`` (in the process that made it)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self._pid = os.getpid()

    @property
    def description(self) -> str:
        return self.sink.description

    def write_encoded(self, bodies: Sequence[str]) -> list[str]:
        self.entered.set()
        if os.getpid() == self._pid:
            assert self.opened.wait(30)
        self.batches.append(len(bodies))
        return self.sink.write_encoded(bodies)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


def _gated(sink: EventSink) -> tuple[_Gated, BackgroundEmitter]:
    gated = _Gated(sink)
    return gated, BackgroundEmitter(gated)  # type: ignore[arg-type]


def test_a_burst_from_many_threads_arrives_complete_in_order_and_batched(
    sink: EventSink,
) -> None:
    gated, emitter = _gated(sink)
    writers, per_writer = 6, 150
    refused: list[int] = []

    def write(w: int) -> None:
        for i in range(per_writer):
            if not emitter.emit("scan.progress", f"s{w}", {"i": i}):
                refused.append(i)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Every caller is done while the sink has not written a thing: nobody waited on it.
    assert not any(t.is_alive() for t in threads) and refused == []
    assert emitter.pending == writers * per_writer
    gated.opened.set()
    assert emitter.flush(30)
    assert emitter.pending == 0

    got = sink.read_after(None, 2000)
    assert len(got) == writers * per_writer
    keys = [sink.sort_key(e.id) for e in got]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    per_scan: dict[str, list[int]] = {}
    for e in got:
        per_scan.setdefault(e.scan_id, []).append(e.data["i"])
    assert per_scan == {f"s{w}": list(range(per_writer)) for w in range(writers)}
    # The first write took what came within the sender's linger; the rest went in a few
    # big batches.
    assert sum(gated.batches) == writers * per_writer
    assert max(gated.batches) <= 500 and len(gated.batches) <= 4


def test_events_that_follow_closely_share_one_write(sink: EventSink) -> None:
    # A short scan's start and end, 1 ms apart, with the sender idle before them.
    gated = _Gated(sink)
    gated.opened.set()
    emitter = BackgroundEmitter(gated, linger_s=0.05)  # type: ignore[arg-type]
    emitter.emit("scan.started", "close-1", {"attempt": 1})
    time.sleep(0.001)
    emitter.emit("scan.completed", "close-1", {"attempt": 1})
    assert emitter.flush(10)
    assert gated.batches == [2]
    assert [e.type for e in sink.read_after(None, 10)] == ["scan.started", "scan.completed"]

    # Without the wait, the idle sender writes the first event on its own.
    gated_now = _Gated(sink)
    gated_now.opened.set()
    no_wait = BackgroundEmitter(gated_now, linger_s=0)  # type: ignore[arg-type]
    no_wait.emit("scan.started", "close-2", {"attempt": 1})
    assert no_wait.flush(10)
    no_wait.emit("scan.completed", "close-2", {"attempt": 1})
    assert no_wait.flush(10)
    assert gated_now.batches == [1, 1]


def test_a_sender_that_keeps_writing_waits_longer_and_writes_more_at_once(
    sink: EventSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wide margins, so a slow machine does not turn "busy" into "idle".
    monkeypatch.setattr(event_sender, "BUSY_WITHIN_S", 5.0)
    gated = _Gated(sink)
    gated.opened.set()
    emitter = BackgroundEmitter(gated, linger_s=0, busy_linger_s=0.3)  # type: ignore[arg-type]
    emitter.emit("scan.started", "busy-1", {"attempt": 1})
    assert emitter.flush(10)  # idle before it: written at once, on its own
    emitter.emit("scan.completed", "busy-1", {"attempt": 1})
    time.sleep(0.01)
    emitter.emit("scan.started", "busy-2", {"attempt": 1})
    assert emitter.flush(10)
    assert gated.batches == [1, 2]
    assert [(e.type, e.scan_id) for e in sink.read_after(None, 10)] == [
        ("scan.started", "busy-1"),
        ("scan.completed", "busy-1"),
        ("scan.started", "busy-2"),
    ]


def test_a_busy_sender_is_never_woken_by_an_emit(
    sink: EventSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While events keep coming the sender looks for them on its own clock: an emit (on
    a run's critical path) finds no thread waiting on the queue, so it wakes none."""
    monkeypatch.setattr(event_sender, "BUSY_WITHIN_S", 5.0)
    emitter = BackgroundEmitter(sink, linger_s=0, busy_linger_s=0.05)
    emitter.emit("scan.started", "poll-0", {"attempt": 1})
    assert emitter.flush(10)  # written: the sender is busy from now on
    waiting_at_emit = []
    for i in range(1, 31):
        time.sleep(0.007)
        waiting_at_emit.append(len(getattr(emitter._queue.not_empty, "_waiters")))
        emitter.emit("scan.started", f"poll-{i}", {"attempt": 1})
    assert emitter.flush(10)
    assert waiting_at_emit == [0] * 30
    assert [e.scan_id for e in sink.read_after(None, 100)] == [f"poll-{i}" for i in range(31)]


def test_the_time_is_when_the_event_happened_not_when_it_was_written(sink: EventSink) -> None:
    gated, emitter = _gated(sink)
    before = datetime.now(UTC)
    emitter.emit("scan.progress", "s", {"i": 0})
    after = datetime.now(UTC)
    time.sleep(0.3)
    gated.opened.set()
    assert emitter.flush(10)
    (event,) = sink.read_after(None, 10)
    assert before <= datetime.fromisoformat(event.data["at"]) <= after


def test_an_event_is_what_was_reported_even_if_the_runner_changes_it_later(
    sink: EventSink,
) -> None:
    gated, emitter = _gated(sink)
    resources = ["aws"]
    emitter.emit("scan.progress", "s", {"resources": resources, "where": Path("/a")})
    resources.append("gcp")
    gated.opened.set()
    assert emitter.flush(10)
    (event,) = sink.read_after(None, 10)
    assert event.data["resources"] == ["aws"] and event.data["where"] == "/a"


def test_a_full_queue_drops_and_counts_instead_of_waiting(sink: EventSink) -> None:
    gated = _Gated(sink)
    emitter = BackgroundEmitter(gated, max_queued=5)  # type: ignore[arg-type]
    before = event_sender.emit_failures
    assert emitter.emit("scan.progress", "s", {"i": 0})
    assert gated.entered.wait(10)  # the sender holds event 0; the queue is empty
    assert [emitter.emit("scan.progress", "s", {"i": i}) for i in range(1, 9)] == [True] * 5 + [
        False
    ] * 3
    assert event_sender.emit_failures - before == 3
    gated.opened.set()
    assert emitter.flush(10)
    assert [e.data["i"] for e in sink.read_after(None, 100)] == list(range(6))
    assert event_sender.emit_failures - before == 3


def test_a_dead_redis_costs_the_caller_nothing(tmp_path: Path) -> None:
    emitter = BackgroundEmitter(_dead_redis_sink(tmp_path))
    before = event_sender.emit_failures
    started = time.monotonic()
    for i in range(200):
        emitter.emit("scan.progress", "s", {"i": i})
    assert time.monotonic() - started < 0.5
    assert emitter.flush(10)
    assert event_sender.emit_failures - before == 200


@pytest.fixture
def hanging_redis_url() -> Iterator[str]:
    """A server that takes connections and never answers: a frozen Redis, with a password."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes the handshakes; nothing ever replies
    yield f"redis://:s3cret@127.0.0.1:{listener.getsockname()[1]}/0"
    listener.close()


def test_a_hanging_redis_never_blocks_the_caller_and_costs_one_timeout(
    hanging_redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from scanqueue.db.redisconn import SOCKET_TIMEOUT_S

    sink = build_event_sink(_settings(f"sqlite:///{tmp_path / 'x.db'}", hanging_redis_url))
    emitter = BackgroundEmitter(sink)
    before = event_sender.emit_failures
    with caplog.at_level(logging.WARNING, logger="scanqueue.observe.event_sender"):
        slowest = 0.0
        for i in range(50):
            started = time.monotonic()
            assert emitter.emit("scan.progress", "s", {"i": i, "triggered_by_token": "tok"})
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 0.05, f"an emit took {slowest:.3f}s"
        started = time.monotonic()
        assert emitter.flush(SOCKET_TIMEOUT_S * 3)
        # One socket timeout for the lot, not one per event (or per batch).
        assert time.monotonic() - started < SOCKET_TIMEOUT_S * 1.8
        assert event_sender.emit_failures - before == 50
        # Backing off: dropped at once, not queued behind another timeout.
        started = time.monotonic()
        assert emitter.emit("scan.progress", "s", {"i": 50}) is False
        assert time.monotonic() - started < 0.05
        assert event_sender.emit_failures - before == 51
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "scanqueue.observe.event_sender"
    ]
    assert len(warnings) == 1, warnings
    assert sink.description in warnings[0] and "dropped" in warnings[0]
    assert "s3cret" not in caplog.text and "tok" not in caplog.text


def test_flush_after_a_run_makes_its_events_readable(sink: EventSink) -> None:
    gated = _Gated(sink)
    observer = EventObserver(gated)  # type: ignore[arg-type]
    run = RunInfo("s1", 1, ["aws"], ["soc2"])
    observer.started(run)
    observer.event(run, "scan.progress", {"percent": 50, "triggered_by_token": "sekrit"})
    observer.finished(run, _row("completed"), 0.5)
    assert sink.read_after(None, 10) == []  # queued, not written yet
    assert flush_pending_events(0.2) is False  # the sink is stalled: the timeout holds
    gated.opened.set()
    assert flush_pending_events(10)
    got = sink.read_after(None, 10)
    assert [e.type for e in got] == ["scan.started", "scan.progress", "scan.completed"]
    assert all("sekrit" not in e.to_json() for e in got)
    assert flush_pending_events(0)  # nothing pending: no wait


def test_one_emitter_per_sink_in_a_process(sink: EventSink) -> None:
    first, second = EventObserver(sink), EventObserver(sink)
    assert first.emitter is second.emitter is background_emitter_for(sink)
    run = RunInfo("s1", 1, [], [])
    first.started(run)
    second.event(run, "scan.progress", {"n": 1})
    first.finished(run, _row("completed"), 0.1)
    assert second.flush(10)
    assert [e.type for e in sink.read_after(None, 10)] == [
        "scan.started",
        "scan.progress",
        "scan.completed",
    ]


def test_a_forked_child_writes_its_own_events_and_not_its_parents(
    redis_url: str, tmp_path: Path
) -> None:
    sink = build_event_sink(_settings(f"sqlite:///{tmp_path / 'x.db'}", redis_url))
    gated, emitter = _gated(sink)
    emitter.emit("scan.progress", "s", {"who": "parent-1"})
    assert gated.entered.wait(10)  # the parent's sender is inside a write
    emitter.emit("scan.progress", "s", {"who": "parent-2"})  # and this one waits in the queue
    pid = os.fork()
    if pid == 0:  # the child: as a prefork pool process after the fork
        code = 1
        try:
            if emitter.pending == 0 and emitter.emit("scan.progress", "s", {"who": "child"}):
                code = 0 if emitter.flush(10) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [e.data["who"] for e in sink.read_after(None, 10)] == ["child"]
    gated.opened.set()
    assert emitter.flush(10)
    assert [e.data["who"] for e in sink.read_after(None, 10)] == ["child", "parent-1", "parent-2"]


def test_the_pool_process_exit_path_flushes(sink: EventSink) -> None:
    from scanqueue.worker.app import _pool_process_down

    gated, emitter = _gated(sink)
    emitter.emit("scan.completed", "s", {"attempt": 1})
    threading.Timer(0.2, gated.opened.set).start()
    _pool_process_down(pid=None)
    assert [e.type for e in sink.read_after(None, 10)] == ["scan.completed"]
