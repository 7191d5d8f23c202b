"""A start that claims its successor (PostgreSQL): the scan a bridge's claim would take
next; under pauses and per-key limits judged as the claim judges them, under the
claims' lock (scanqueue/worker/successor.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from scanqueue.config import normalize_database_url
from scanqueue.db.rows import SuccessorWindow
from scanqueue.db.store import Store, store_for
from scanqueue.errors import UnavailableError
from scanqueue.worker.successor import Successors
from tests.conftest import scans_rows_read, sql, upgrade

DEFAULT = SuccessorWindow(fixed=0, minimum=4, per_slot=2, stale_after_s=20.0)
POLICED = replace(DEFAULT, policed=True)
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


def _queued(
    url: str, rows: Sequence[tuple[str, int]], *, seen: bool = True, key: str = "aws|soc2"
) -> None:
    """Queued rows (id, priority), oldest first; taken in (with ``key``) unless
    ``seen=False``."""
    for n, (scan_id, priority) in enumerate(rows):
        sql(
            url,
            "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority,"
            " created_at, seen_at, effective_key, scan_key) VALUES (:id, 'queued',"
            " '[\"aws\"]', '[\"soc2\"]', :p, now() + :n * interval '1 ms',"
            " CASE WHEN :seen THEN now() END, CASE WHEN :seen THEN :key END,"
            " CASE WHEN :key <> 'aws|soc2' THEN :key END)",
            {"id": scan_id, "p": priority, "n": n, "seen": seen, "key": key},
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
def test_the_plain_statement_claims_nothing_under_a_pause_or_limit_and_says_so(
    pg: tuple[str, Store], policy: str
) -> None:
    url, store = pg
    _queued(url, [("own", 0), ("next", 0), ("then", 0)])
    _dispatch(url, "own")
    sql(url, policy)
    started = store.start_run("own", "w", successor=DEFAULT)
    assert started is not None and started.successor_id is None
    assert started.successor_policed is True  # the next start asks with POLICED
    assert _dispatched(url) == set()
    sql(url, "DELETE FROM scanqueue_pauses; DELETE FROM scanqueue_limits")
    _dispatch(url, "next")
    started = store.start_run("next", "w", successor=POLICED)
    assert started is not None and started.successor_id == "then"
    assert started.successor_policed is False  # and back to the plain one


def _running(url: str, scan_id: str, key: str) -> None:
    _queued(url, [(scan_id, 0)], key=key)
    sql(url, "UPDATE scans SET status = 'running' WHERE id = :id", {"id": scan_id})


def test_a_policed_start_claims_the_first_row_whose_key_has_room(pg: tuple[str, Store]) -> None:
    """As the claim's first step: a full key's and a paused key's rows are passed over
    for the next row in claim order; limits count running and dispatched scans."""
    url, store = pg
    sql(url, "INSERT INTO scanqueue_limits (key, max_running) VALUES ('full', 2)")
    sql(url, "INSERT INTO scanqueue_pauses (key) VALUES ('held')")
    _running(url, "full-running", "full")
    _queued(url, [("own", 0)], key="full")  # dispatched: with the running one, 2 of 2
    _dispatch(url, "own")
    _queued(url, [("full-next", 9)], key="full")
    _queued(url, [("held-next", 8)], key="held")
    _queued(url, [("free-next", 1), ("free-later", 1)], key="free")
    started = store.start_run("own", "w", successor=POLICED)
    assert started is not None and started.scan_id == "own"
    assert started.successor_id == "free-next" and started.successor_policed is True
    assert _dispatched(url) == {"free-next"}
    # The started scan kept its key's count: "full" is still full.
    started = store.start_run("free-next", "w", successor=POLICED)
    assert started is not None and started.successor_id == "free-later"


def test_a_policed_start_judges_the_default_limit_and_a_whole_queue_pause(
    pg: tuple[str, Store],
) -> None:
    url, store = pg
    limited = replace(DEFAULT, key_limit=1)  # SCANQUEUE_MAX_RUNNING_PER_KEY=1
    _queued(url, [("own", 0), ("same-key", 0)])
    _queued(url, [("other-key", 0)], key="other")
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=limited)
    assert started is not None and started.successor_id == "other-key"
    sql(url, "INSERT INTO scanqueue_pauses (key) VALUES ('*')")
    _queued(url, [("third", 0)], key="third")
    started = store.start_run("other-key", "w", successor=limited)
    assert started is not None and started.successor_id is None
    assert _dispatched(url) == set()


def test_a_policed_start_leaves_an_unseen_head_to_the_bridge(pg: tuple[str, Store]) -> None:
    url, store = pg
    sql(url, "INSERT INTO scanqueue_limits (key, max_running) VALUES ('aws|soc2', 5)")
    _queued(url, [("own", 0), ("seen", 0)])
    _queued(url, [("unseen", 9)], seen=False)
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=POLICED)
    assert started is not None and started.successor_id is None
    assert _dispatched(url) == set()


def test_a_policed_start_claims_nothing_while_a_claim_holds_the_lock(
    pg: tuple[str, Store],
) -> None:
    """A bridge's claim, not yet committed, has filled key "d" (limit 1) and a row of
    "d" that outranks it arrived since: a start whose statement read the table then
    would see "d" free and claim that row too.  The lock is only tried: the start
    claims nothing, never waits, and still starts its own scan (its start signal
    then wakes the bridge).  Once the claim committed, "d" is seen full."""
    from sqlalchemy import create_engine, text

    from scanqueue.db.claim_sql import DISPATCH_LOCK_KEY

    url, store = pg
    sql(url, "INSERT INTO scanqueue_limits (key, max_running) VALUES ('d', 1)")
    _queued(url, [("own", 0), ("then", 0)])
    _queued(url, [("d-claimed", 5)], key="d")
    _dispatch(url, "own")
    engine = create_engine(url)
    try:
        with engine.begin() as bridge:
            bridge.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": DISPATCH_LOCK_KEY})
            bridge.execute(text("UPDATE scans SET dispatched_at = now() WHERE id = 'd-claimed'"))
            _queued(url, [("d-urgent", 9)], key="d")
            started = store.start_run("own", "w", successor=POLICED)
            assert started is not None and started.scan_id == "own"
            assert started.successor_id is None
        assert _dispatched(url) == {"d-claimed"}
        # Free again (and the statement's setting did not outlive its transaction); "d"
        # holds its one slot, so "d-urgent" is passed over.
        started = store.start_run("d-claimed", "w", successor=POLICED)
        assert started is not None and started.successor_id == "then"
    finally:
        engine.dispose()


def test_a_policed_start_is_committed_before_its_claim(pg: tuple[str, Store]) -> None:
    """Two transactions in one round trip: the start commits with the server's
    synchronous_commit (durable, as every start), then the claim, holding the lock,
    commits without waiting for its flush.  A claim that fails leaves the start
    standing (its answer lost, as when a connection drops after a commit)."""
    url, store = pg
    sent = store._direct_start_policed_successor.prepared
    assert sent is not None
    start, commit, lock, claim = sent.execute_sql.split("; ")
    assert start.startswith("EXECUTE ") and commit == "COMMIT" and claim.startswith("EXECUTE ")
    assert "set_config('synchronous_commit', 'off', true)" in lock
    _queued(url, [("own", 0), ("next", 0), ("then", 0)])
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=POLICED)
    assert started is not None and started.successor_id == "next"
    assert store._direct is not None
    cur = store._direct._connection().cursor()
    try:
        cur.execute("SHOW synchronous_commit")
        assert cur.fetchone()[0] == "on"  # the claim's setting ended with it
    finally:
        cur.close()
    fresh = store_for(url)  # statements not prepared yet: they run as written
    sql(url, "ALTER TABLE scanqueue_limits RENAME TO limits_gone")
    try:
        with pytest.raises(sa_exc.ProgrammingError, match="scanqueue_limits"):
            fresh.start_run("next", "w", successor=POLICED)
    finally:
        sql(url, "ALTER TABLE limits_gone RENAME TO scanqueue_limits")
        fresh.dispose()
    assert sql(url, "SELECT status, attempts FROM scans WHERE id = 'next'") == [("running", 1)]
    assert _dispatched(url) == set()


def test_a_policed_start_that_swaps_claims_no_successor(pg: tuple[str, Store]) -> None:
    """Its own scan cannot start (a higher priority is dispatched): the swap starts
    that one, as without successors, and nothing is claimed."""
    url, store = pg
    _queued(url, [("own", 0), ("urgent", 5), ("next", 0)])
    _dispatch(url, "own", "urgent")
    started = store.start_run("own", "w", successor=POLICED)
    assert started is not None and started.scan_id == "urgent"
    assert started.successor_id is None
    assert _dispatched(url) == set()  # "own" released for the bridge


def test_a_policed_starts_claim_reads_the_head_not_the_backlog(pg: tuple[str, Store]) -> None:
    """The claim's plan, made generic on a near-empty table (a new database), reads the
    head of the claim order and the window, not the 10**4 queued rows.  (Joining the
    chosen row back to ``scans`` once read every queued row.)"""
    url, store = pg
    assert store._direct is not None
    cur = store._direct._connection().cursor()
    cur.execute("SET plan_cache_mode = force_generic_plan")
    _queued(url, [("own", 0), ("next", 0)])
    _dispatch(url, "own")
    started = store.start_run("own", "w", successor=POLICED)  # prepared and planned here
    assert started is not None and started.successor_id == "next"
    sql(
        url,
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority,"
        " effective_key, seen_at) SELECT 's' || i, 'queued', '[]', '[]', (i % 4) * 10,"
        " 'k' || (i % 20), now() FROM generate_series(0, 9999) i",
    )
    form = store._direct_start_policed_successor.prepared
    assert form is not None
    claim = form.execute_sql.split("; ")[-1]
    values = {"window": 0, "min_window": 4, "per_slot": 2, "stale_s": 20.0, "key_limit": 2}
    try:
        cur.execute("BEGIN")
        cur.execute(
            "SELECT set_config('scanqueue.started', 'own', true),"
            " set_config('scanqueue.successor_lock', 'true', true)"
        )
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + claim, values)
        plan = cur.fetchone()[0]
    finally:
        cur.execute("ROLLBACK")
        cur.execute("RESET plan_cache_mode")
        cur.close()
    assert "Custom" not in str(plan)
    read = scans_rows_read(plan)
    assert 0 < read < 200, read


def test_policed_starts_and_a_bridge_never_exceed_a_keys_limit(pg: tuple[str, Store]) -> None:
    """A soak: starts claiming successors in six threads and a bridge claiming beside
    them, over four keys with a limit of 1.  A key never holds more than 1 slot
    (running plus dispatched), as a watcher reading every few ms sees, and every scan
    runs once.  (The race the lock closes is too narrow for a soak to hit: the test
    above builds it.)"""
    import time

    url, store = pg
    keys = ("k0", "k1", "k2", "k3")
    for i in range(15):
        for key in keys:
            _queued(url, [(f"{key}-{i:02d}", 0)], key=key)
    limited = replace(DEFAULT, key_limit=1, fixed=8)
    worst: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    successors: list[str] = []
    lock = threading.Lock()

    def watch() -> None:
        while not stop.is_set():
            rows = sql(
                url,
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM scans"
                " WHERE status = 'running' OR (status = 'queued' AND dispatched_at IS NOT NULL)"
                " GROUP BY effective_key) c",
            )
            worst.append(int(rows[0][0]))
            time.sleep(0.002)

    def bridge() -> None:
        while not stop.is_set():
            store.claim_within_window(8, 8, key_limit=1)
            time.sleep(0.02)

    def worker() -> None:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                rows = sql(
                    url,
                    "SELECT id FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL"
                    " ORDER BY random() LIMIT 1",
                )
                if not rows:
                    if not sql(url, "SELECT 1 FROM scans WHERE status <> 'completed' LIMIT 1"):
                        return
                    time.sleep(0.002)
                    continue
                run = store.start_run(rows[0][0], "w", successor=limited)
                if run is None:
                    continue  # another thread started it first
                if run.successor_id is not None:
                    with lock:
                        successors.append(run.successor_id)
                time.sleep(0.01)
                store.finish_run(run.scan_id, run.attempt, "completed")
        except BaseException as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=watch), threading.Thread(target=bridge)]
    workers = [threading.Thread(target=worker) for _ in range(6)]
    for t in helpers + workers:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    for t in helpers:
        t.join(30)
    assert errors == []
    assert worst and max(worst) <= 1, max(worst)
    assert successors, "the starts claimed no successor at all"
    assert sql(url, "SELECT status, count(*) FROM scans GROUP BY status") == [("completed", 60)]
    assert sql(url, "SELECT max(attempts), max(dispatch_count) FROM scans") == [(1, 1)]


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
        settings=ExecutionSettings(heartbeat_every_s=0.5, lease_s=5, cancel_grace_s=0.5),
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
            settings=ExecutionSettings(heartbeat_every_s=0.5, lease_s=5, cancel_grace_s=0.5),
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
    settings = ExecutionSettings(heartbeat_every_s=0.5, lease_s=5, cancel_grace_s=0.5)

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
