"""OpenLineage run events, checked against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from scanqueue.config import Settings
from scanqueue.observe import lineage
from scanqueue.observe.lineage import LineageObserver, lineage_configured, lineage_observer, run_id
from scanqueue.observe.observer import SafeObservers
from scanqueue.runners.api import Job, RunnerFunc, ScanContext, ScanResult
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from scanqueue.worker.runtime import build_observer
from tests.claimed import mark_dispatched
from tests.conftest import Proc, base_env, free_port, start_worker, upgrade, wait_for
from tests.runners import failing_runner, progress_runner

FAST = ExecutionSettings(heartbeat_every_s=0.1, lease_s=30, cancel_grace_s=5)


class Receiver:
    """An OpenLineage HTTP endpoint that records what it is sent."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.paths.append(self.path)
                receiver.received.append(json.loads(body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of(self, scan_id: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.received
            if e["run"]["facets"].get("scanqueue", {}).get("scan_id") == scan_id
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def isolated_openlineage_env() -> Iterator[None]:
    """The OpenLineage client writes aliases into os.environ; keep them out of other tests."""
    before = {k: v for k, v in os.environ.items() if k.startswith("OPENLINEAGE")}
    for key in before:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _observer(url: str) -> LineageObserver:
    os.environ["OPENLINEAGE_URL"] = url
    observer = lineage_observer()
    assert observer is not None
    return observer


def _run(store: Any, runner: Any, observer: LineageObserver, **enqueue: Any) -> tuple[str, Outcome]:
    row = store.enqueue(["aws", "gcp"], ["soc2", "cis"], **enqueue)
    mark_dispatched(store, row.id)
    outcome = execute_scan(
        row.id, store=store, runner=RunnerFunc(runner), settings=FAST, observer=observer
    )
    return row.id, outcome


def test_start_and_complete_with_the_scanqueue_facet(store: Any, receiver: Receiver) -> None:
    observer = _observer(receiver.url)
    scan_id, outcome = _run(store, progress_runner, observer, user="u", token="tok-SECRET-1")
    assert outcome is Outcome.COMPLETED
    assert observer.flush(10)
    start, complete = receiver.of(scan_id)
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    assert receiver.paths == ["/api/v1/lineage", "/api/v1/lineage"]
    for event in (start, complete):
        assert event["job"] == {"namespace": "scanqueue", "name": "scan", "facets": {}}
        assert event["run"]["runId"] == run_id(scan_id, 1)
        facet = event["run"]["facets"]["scanqueue"]
        assert facet["scan_id"] == scan_id and facet["attempt"] == 1
        assert facet["providers"] == ["aws", "gcp"]
        assert facet["frameworks"] == ["soc2", "cis"]
        assert facet["_producer"] and facet["_schemaURL"]
        assert event["eventTime"].endswith("+00:00")
    assert "tok-SECRET-1" not in json.dumps(receiver.received)
    # The run id is deterministic per (scan, attempt) and differs between attempts.
    assert uuid.UUID(run_id(scan_id, 1)).version == 5
    assert run_id(scan_id, 1) == run_id(scan_id, 1) != run_id(scan_id, 2)


def test_a_failed_scan_sends_fail_with_the_error(store: Any, receiver: Receiver) -> None:
    observer = _observer(receiver.url)
    scan_id, outcome = _run(store, failing_runner, observer)
    assert outcome is Outcome.FAILED
    assert observer.flush(10)
    start, fail = receiver.of(scan_id)
    assert [start["eventType"], fail["eventType"]] == ["START", "FAIL"]
    assert fail["run"]["facets"]["errorMessage"]["message"] == "scanner exploded on aws,gcp"


def test_a_canceled_scan_sends_abort(store: Any, receiver: Receiver) -> None:
    observer = _observer(receiver.url)
    started = threading.Event()

    def waits(job: Job, ctx: ScanContext) -> ScanResult:
        started.set()
        ctx.wait(20)
        return ScanResult(findings_count=0)

    row = store.enqueue(["aws"], [])
    mark_dispatched(store, row.id)
    result: list[Outcome] = []
    t = threading.Thread(
        target=lambda: result.append(
            execute_scan(
                row.id, store=store, runner=RunnerFunc(waits), settings=FAST, observer=observer
            )
        )
    )
    t.start()
    assert started.wait(10)
    store.cancel(row.id)
    t.join(15)
    assert result == [Outcome.CANCELED]
    assert observer.flush(10)
    assert [e["eventType"] for e in receiver.of(row.id)] == ["START", "ABORT"]


def test_unset_means_no_observer_and_nothing_sent(
    store: Any, receiver: Receiver, tmp_path: Path
) -> None:
    assert not lineage_configured()
    assert lineage_observer() is None
    settings = Settings.from_env({"DATABASE_URL": store.database_url})
    observers = build_observer(settings)
    assert isinstance(observers, SafeObservers)
    assert not any(isinstance(o, LineageObserver) for o in observers.observers)
    assert lineage_configured({"OPENLINEAGE_URL": "http://x"})
    assert lineage_configured({"OPENLINEAGE__TRANSPORT__TYPE": "console"})
    assert not lineage_configured({"OPENLINEAGE_URL": "http://x", "OPENLINEAGE_DISABLED": "true"})
    time.sleep(0.2)
    assert receiver.received == []


def test_an_unreachable_receiver_never_delays_or_fails_a_scan(store: Any) -> None:
    observer = _observer(f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    _scan_id, outcome = _run(store, progress_runner, observer)
    assert outcome is Outcome.COMPLETED
    assert time.monotonic() - began < 2  # the client retries for seconds, off the scan's path


def test_a_refusing_receiver_is_logged_and_counted(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = Receiver(status=400)
    try:
        observer = _observer(refusing.url)
        before = lineage.dropped
        with caplog.at_level(logging.WARNING, logger="scanqueue.observe.lineage"):
            _scan_id, outcome = _run(store, progress_runner, observer)
            assert outcome is Outcome.COMPLETED
            assert observer.flush(10)
        assert lineage.dropped - before == 2
        assert "not delivered" in caplog.text
        # Logged once while the receiver stays down, not once per event.
        assert caplog.text.count("not delivered") == 1
    finally:
        refusing.close()


def test_the_queue_is_bounded(store: Any) -> None:
    blocker = threading.Event()

    class SlowClient:
        def emit(self, event: Any) -> None:
            blocker.wait(10)

    observer = LineageObserver(client_factory=SlowClient, queue_max=3)
    before = lineage.dropped
    began = time.monotonic()
    for _ in range(3):
        _run(store, progress_runner, observer)
    assert time.monotonic() - began < 5
    # 6 events: one is being sent, 3 wait, the rest were dropped without waiting.
    assert lineage.dropped - before == 2
    blocker.set()
    assert observer.flush(10)


@pytest.mark.slow
def test_a_real_worker_sends_lineage(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc], receiver: Receiver
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:progress_runner",
        OPENLINEAGE_URL=receiver.url,
    )
    start_worker(procs, env, tmp_path)
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import store_for

    store = store_for(normalize_database_url(pg_url))
    row = store.enqueue(["aws"], ["soc2"], token="tok-SECRET-2")
    wait_for(lambda: len(receiver.of(row.id)) >= 2, 60, what="START and COMPLETE")
    assert store.get(row.id).status == "completed"
    start, complete = receiver.of(row.id)
    assert [start["eventType"], complete["eventType"]] == ["START", "COMPLETE"]
    assert start["run"]["runId"] == complete["run"]["runId"] == run_id(row.id, 1)
    assert "tok-SECRET-2" not in json.dumps(receiver.received)


@pytest.mark.slow
def test_a_real_worker_completes_scans_with_the_receiver_down(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:progress_runner",
        OPENLINEAGE_URL=f"http://127.0.0.1:{free_port()}",
    )
    worker = start_worker(procs, env, tmp_path)
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import store_for

    store = store_for(normalize_database_url(pg_url))
    began = time.monotonic()
    rows = [store.enqueue(["aws"], []) for _ in range(3)]
    wait_for(
        lambda: all(store.get(r.id).status == "completed" for r in rows),
        20,
        what="scans completed",
    )
    assert time.monotonic() - began < 10
    wait_for(lambda: "not delivered" in worker.output(), 30, what="the failure logged")


def test_the_reaper_ends_a_dead_workers_runs_in_lineage(store: Any, receiver: Receiver) -> None:
    from scanqueue.dispatch.service import _lost_run_events

    os.environ["OPENLINEAGE_URL"] = receiver.url
    settings = Settings.from_env(
        {"DATABASE_URL": store.database_url, "OPENLINEAGE_URL": receiver.url}
    )
    lost_runs = _lost_run_events(settings)
    again, gone = store.enqueue(["aws"], ["cis"]), store.enqueue(["aws"], ["cis"])
    # Each reap waits past the start's millisecond: "older than 0 s" is strict, and
    # SQLite's clock counts milliseconds.
    mark_dispatched(store, again.id, gone.id)
    assert store.start_run(again.id, "dead-worker") is not None
    time.sleep(0.01)
    reaped = store.reap_orphans(lease_s=0, max_attempts=3)  # its heartbeat went stale
    assert store.start_run(gone.id, "dead-worker") is not None
    time.sleep(0.01)
    reaped += store.reap_orphans(lease_s=0, max_attempts=1)  # its last attempt
    assert [(r.scan_id, r.requeued) for r in reaped] == [(again.id, True), (gone.id, False)]

    lost_runs(reaped)
    wait_for(lambda: len(receiver.received) == 2, 10, what="two lineage events")
    (aborted,) = receiver.of(again.id)
    (failed,) = receiver.of(gone.id)
    # The next attempt of a re-queued scan is a run of its own: this one is aborted.
    assert aborted["eventType"] == "ABORT" and aborted["run"]["runId"] == run_id(again.id, 1)
    assert failed["eventType"] == "FAIL" and failed["run"]["runId"] == run_id(gone.id, 1)
    assert failed["run"]["facets"]["errorMessage"]["message"] == "worker lost"
