"""A start that claims its successor (PostgreSQL): the scan a bridge's claim would take
next, only when that claim needs none of its judgement (scanqueue/worker/successor.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from scanqueue.config import normalize_database_url
from scanqueue.db.rows import SuccessorWindow
from scanqueue.db.store import Store, store_for
from scanqueue.errors import UnavailableError
from scanqueue.worker.successor import Successors
from tests.conftest import sql, upgrade

DEFAULT = SuccessorWindow(fixed=0, minimum=4, per_slot=2, stale_after_s=20.0)
QUICK = {"heartbeat_every_s": 0.5, "lease_s": 5, "cancel_grace_s": 0.5}


@pytest.fixture
def pg(pg_url: str) -> tuple[str, Store]:
    upgrade(pg_url)
    url = normalize_database_url(pg_url)
    return url, store_for(url)


@pytest.fixture
def own_dispatched(pg: tuple[str, Store]) -> tuple[str, Store]:
    """Two queued rows taken in: "own", dispatched (its message is the one run), and
    "next", the successor its start claims."""
    url, _ = pg
    _queued(url, [("own", 0), ("next", 0)])
    _dispatch(url, "own")
    return pg


def _queued(url: str, rows: Sequence[tuple[str, int]], *, seen: bool = True) -> None:
    """Queued rows (id, priority), oldest first; taken in (keyed) unless ``seen=False``."""
    for n, (scan_id, priority) in enumerate(rows):
        sql(
            url,
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority,"
            " created_at, seen_at, effective_key) VALUES (:id, 'queued', '[\"aws\"]',"
            " '[\"soc2\"]', :p, now() + :n * interval '1 ms',"
            " CASE WHEN :seen THEN now() END, CASE WHEN :seen THEN 'aws|soc2' END)",
            {"id": scan_id, "p": priority, "n": n, "seen": seen},
        )


def _dispatch(url: str, *ids: str) -> None:
    sql(
        url,
        "UPDATE scans SET dispatched_at = clock_timestamp(), dispatch_count = 1"
        " WHERE id = ANY(:ids)",
        {"ids": list(ids)},
    )


def _dispatched(url: str) -> set[str]:
    rows = sql(url, "SELECT id FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL")
    return {r[0] for r in rows}


def test_a_start_claims_the_next_scan_in_claim_order(pg: tuple[str, Store]) -> None:
    url, store = pg
    _queued(url, [("own", 0), ("old", 0), ("urgent", 5), ("new", 0)])
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=DEFAULT)
    assert started is not None and started.scan_id == "own"
    assert started.successor_id == "urgent"  # priority first, then age
    assert _dispatched(url) == {"urgent"}
    assert sql(url, "SELECT dispatch_count FROM scans WHERE id = 'urgent'") == [(1,)]
    nxt = store.start_run("urgent", "w", successor=DEFAULT)
    assert nxt is not None and nxt.successor_id == "old"


def test_no_successor_without_being_asked_or_when_nothing_may_run(pg: tuple[str, Store]) -> None:
    url, store = pg
    _queued(url, [("own", 0), ("later", 0), ("other", 0)])
    sql(url, "UPDATE scans SET run_after = now() + interval '1 hour' WHERE id = 'later'")
    _dispatch(url, "own")
    started = store.start_run("own", "w")
    assert started is not None and started.successor_id is None
    _dispatch(url, "other")
    started = store.start_run("other", "w", successor=DEFAULT)
    assert started is not None and started.successor_id is None  # run_after: not yet
    assert _dispatched(url) == set()


def test_a_row_not_taken_in_yet_is_left_to_the_bridge(pg: tuple[str, Store]) -> None:
    """The next row in claim order is unseen (no scan.queued yet): no successor at all,
    not the one after it, so priority order holds."""
    url, store = pg
    _queued(url, [("own", 0), ("seen", 0)])
    _queued(url, [("unseen", 9)], seen=False)
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=DEFAULT)
    assert started is not None and started.successor_id is None
    assert _dispatched(url) == set()


@pytest.mark.parametrize(
    "policy",
    [
        "INSERT INTO scanqueue_pauses (key) VALUES ('*')",
        "INSERT INTO scanqueue_pauses (key) VALUES ('gcp|iso')",
        "INSERT INTO scanqueue_limits (key, max_running) VALUES ('aws|soc2', 5)",
    ],
)
def test_pauses_and_limits_leave_every_claim_to_the_bridge(
    pg: tuple[str, Store], policy: str
) -> None:
    url, store = pg
    _queued(url, [("own", 0), ("next", 0)])
    _dispatch(url, "own")
    sql(url, policy)
    started = store.start_run("own", "w", successor=DEFAULT)
    assert started is not None and started.successor_id is None
    assert _dispatched(url) == set()


def test_the_window_is_never_exceeded(pg: tuple[str, Store]) -> None:
    """In flight before the start (the started scan included) must be within the window:
    a start then keeps the count; over it (the window shrank), it lets the count fall."""
    url, store = pg
    _queued(url, [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 0)])
    _dispatch(url, "a", "b", "c")
    fixed = SuccessorWindow(fixed=2, minimum=4, per_slot=2, stale_after_s=20.0)
    started = store.start_run("a", "w", successor=fixed)
    assert started is not None and started.successor_id is None  # 3 in flight > 2
    assert _dispatched(url) == {"b", "c"}
    started = store.start_run("b", "w", successor=fixed)
    assert started is not None and started.successor_id == "d"  # 2 in flight: kept at 2
    assert _dispatched(url) == {"c", "d"}
    # The default: twice the live workers' slots, at least the minimum.
    sql(url, "INSERT INTO scanqueue_workers (id, hostname, pid, slots) VALUES ('x', 'h', 1, 1)")
    started = store.start_run("c", "w", successor=DEFAULT)
    assert started is not None and started.successor_id == "e"  # 2 in flight <= max(4, 2)


def test_concurrent_starts_claim_different_successors(pg: tuple[str, Store]) -> None:
    url, store = pg
    ids = [f"s{i:02d}" for i in range(40)]
    _queued(url, [(i, 0) for i in ids])
    firsts = ids[:4]
    _dispatch(url, *firsts)
    got: list[Any] = []
    lock = threading.Lock()

    def start(scan_id: str) -> None:
        run = store.start_run(scan_id, "w", successor=DEFAULT)
        with lock:
            got.append(run)

    threads = [threading.Thread(target=start, args=(i,)) for i in firsts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    successors = [r.successor_id for r in got if r is not None]
    assert len(got) == 4 and all(r is not None for r in got)
    assert len(successors) == len(set(successors)) == 4
    assert _dispatched(url) == set(successors)
    assert sql(url, "SELECT max(dispatch_count) FROM scans") == [(1,)]


def test_a_successor_whose_message_cannot_go_is_released(own_dispatched: tuple[str, Store]) -> None:
    url, store = own_dispatched
    started = store.start_run("own", "w", successor=DEFAULT)
    assert started is not None and started.successor_id == "next"
    counted: list[int] = []

    def broker_down(ids: Sequence[str]) -> None:
        raise UnavailableError("cannot reach broker redis://127.0.0.1:1/0")

    failed = Successors(store, DEFAULT, broker_down, counted.append).send_early("next")
    assert failed.failed_at_once and failed.settle() is False
    assert _dispatched(url) == set() and counted == []  # queued again, for the bridge
    sent: list[str] = []
    went = Successors(store, DEFAULT, sent.extend, counted.append).send_early("next")
    assert not went.failed_at_once and went.settle() is True
    assert sent == ["next"] and counted == [1]


def test_a_successor_whose_late_answer_says_it_did_not_go_is_released_and_the_bridge_woken(
    pg: tuple[str, Store], redis_url: str, tmp_path: Any
) -> None:
    """On the Redis broker's short way the message is written before the run and the
    answer read after it: when that answer is an error (and kombu's publish fails too),
    the scan is released for the bridge, which is woken, since the start said the
    window was as full as before."""
    import redis
    from celery import Celery

    from scanqueue.config import Settings
    from scanqueue.dispatch.publish import make_publisher
    from scanqueue.worker.app import QUEUE, celery_defaults

    url, store = pg
    settings = Settings.from_env({"DATABASE_URL": url, "CELERY_BROKER_URL": redis_url})
    app = Celery("successor-test")
    app.conf.update(celery_defaults(settings))
    app.conf.broker_connection_max_retries = 1
    client = redis.Redis.from_url(redis_url)
    publish = make_publisher(app)
    try:
        publish(["warm-up"])  # declares the queue; later messages take the short way
        assert publish.pushes_directly
        _queued(url, [("own", 0), ("next", 0)])
        _dispatch(url, "own")
        started = store.start_run("own", "w", successor=DEFAULT)
        assert started is not None and started.successor_id == "next"
        counted: list[int] = []
        woken: list[str] = []
        successors = Successors(
            store, DEFAULT, publish.send_early, counted.append, lambda: woken.append("woken")
        )
        client.delete(QUEUE)
        client.set(QUEUE, "not a list")
        sent = successors.send_early("next")
        assert not sent.failed_at_once  # written; whether it went is not known yet
        assert _dispatched(url) == {"next"}
        assert sent.settle() is False
        assert sent.settle() is False  # settled once
        assert _dispatched(url) == set() and counted == [] and woken == ["woken"]
    finally:
        client.delete(QUEUE)
        app.close()


def test_a_successors_answer_is_read_after_the_runs_end_is_written(
    own_dispatched: tuple[str, Store],
) -> None:
    from scanqueue.runners.api import RunnerFunc
    from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan

    url, store = own_dispatched
    order: list[str] = []

    def send_early(ids: Sequence[str]) -> Any:
        order.extend(f"sent {i}" for i in ids)

        def answer() -> None:
            status = sql(url, "SELECT status FROM scans WHERE id = 'own'")[0][0]
            order.append(f"answer read, own {status}")

        return answer

    def run(scan_id: str, runner: Any) -> Outcome:
        return execute_scan(
            scan_id,
            store=store,
            runner=RunnerFunc(runner),
            settings=ExecutionSettings(**QUICK),
            successors=Successors(store, DEFAULT, send_early),
        )

    assert run("own", lambda job, ctx: order.append(f"run {job.scan_id}")) is Outcome.COMPLETED
    assert order == ["sent next", "run own", "answer read, own completed"]
    # Also when the run raises through execute_scan (a shutdown): the answer is read.
    _queued(url, [("after", 0)])
    order.clear()

    def shut_down(job: Any, ctx: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("next", shut_down)
    assert order[0] == "sent after" and order[-1].startswith("answer read")


def test_a_run_sends_its_successor_before_the_runner_and_skips_the_start_signal(
    own_dispatched: tuple[str, Store],
) -> None:
    from scanqueue.dispatch.wake import StartSignalObserver
    from scanqueue.observe.observer import NullObserver, RunInfo, SafeObservers
    from scanqueue.runners.api import RunnerFunc
    from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan

    _, store = own_dispatched
    order: list[str] = []
    heard: list[RunInfo] = []

    class Heard(NullObserver):
        def started(self, run: RunInfo) -> None:
            heard.append(run)

    class Signal(StartSignalObserver):
        def started(self, run: RunInfo) -> None:
            if not run.successor_sent:
                order.append("signal")
            super().started(run)

    outcome = execute_scan(
        "own",
        store=store,
        runner=RunnerFunc(lambda job, ctx: order.append(f"run {job.scan_id}")),
        settings=ExecutionSettings(**QUICK),
        observer=SafeObservers([Signal(), Heard()]),
        successors=Successors(store, DEFAULT, lambda ids: order.extend(f"sent {i}" for i in ids)),
    )
    assert outcome is Outcome.COMPLETED
    assert order == ["sent next", "run own"]  # no start signal: the window is as full
    assert [(r.scan_id, r.successor_sent) for r in heard] == [("own", True)]
    # Nothing left to claim: the next start signals the bridge as before.
    order.clear()
    assert (
        execute_scan(
            "next",
            store=store,
            runner=RunnerFunc(lambda job, ctx: order.append(f"run {job.scan_id}")),
            settings=ExecutionSettings(**QUICK),
            observer=SafeObservers([Signal()]),
            successors=Successors(store, DEFAULT, order.extend),
        )
        is Outcome.COMPLETED
    )
    assert order == ["signal", "run next"]


def test_a_process_whose_runs_are_long_asks_for_no_successor(pg: tuple[str, Store]) -> None:
    """A run of SHORT_RUN_S or more left the bridge time to refill after its start
    signal: the next start of that process claims nothing, a short run's does."""
    import time

    from scanqueue.runners.api import RunnerFunc
    from scanqueue.worker.execute import ExecutionSettings, execute_scan
    from scanqueue.worker.successor import SHORT_RUN_S

    url, store = pg
    _queued(url, [("long", 0), ("short", 0), ("then", 0), ("last", 0)])
    _dispatch(url, "long")
    successors = Successors(store, DEFAULT, lambda ids: None)
    settings = ExecutionSettings(**QUICK)

    def run(scan_id: str, seconds: float) -> None:
        execute_scan(
            scan_id,
            store=store,
            runner=RunnerFunc(lambda job, ctx: time.sleep(seconds)),
            settings=settings,
            successors=successors,
        )

    assert successors.wanted() == DEFAULT  # nothing known yet: ask
    run("long", SHORT_RUN_S * 2)  # claims "short" at its start, then runs long
    assert _dispatched(url) == {"short"} and successors.wanted() is None
    run("short", 0)  # its start claims nothing: the bridge refills after long runs
    assert _dispatched(url) == set() and successors.wanted() == DEFAULT
    _dispatch(url, "then")
    run("then", 0)
    assert _dispatched(url) == {"last"}
