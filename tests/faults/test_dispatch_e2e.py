"""Dispatch with real processes: pickup never waits for a leader; the window holds.

* Two workers (each with its embedded bridge); the leader's whole process tree
  is SIGKILLed and a scan inserted at that moment must start within 2 s on the
  survivor (docs/reference.md#events), while the maintenance leadership moves within 30 s —
  with Redis (lock) and without (lease row).
* The broker never holds more than the dispatch window (docs/reference.md#policies), and the
  workers' registrations come and go with them.
* A message the broker lost is re-sent while the workers stay saturated.

Each measured figure is printed (``-s`` shows them).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from scanqueue.config import normalize_database_url
from tests.conftest import (
    Proc,
    all_finished,
    base_env,
    insert_rows,
    report,
    scan_rows,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUNNER = {"SCANQUEUE_RUNNER": "tests.runners:journal_runner"}


def sql(url: str, statement: str, **params: Any) -> list[Any]:
    engine = create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def pickup_s(url: str, scan_id: str) -> float | None:
    row = scan_rows(url).get(scan_id)
    if not row or row["started_at"] is None:
        return None
    return float((row["started_at"] - row["created_at"]).total_seconds())


@pytest.mark.parametrize("leadership", ["redis", "lease"])
def test_sigkill_of_the_leaders_tree_leaves_no_pickup_gap(
    leadership: str, pg_url: str, tmp_path: Path, procs: list[Proc], request: pytest.FixtureRequest
) -> None:
    upgrade(pg_url)
    extra = dict(RUNNER, SCANQUEUE_TEST_RUN_SECONDS="0.05")
    if leadership == "redis":
        extra["REDIS_URL"] = request.getfixturevalue("redis_url")
    else:
        # No REDIS_URL: leadership runs on the lease row in PostgreSQL.  The broker
        # is still a (throwaway) Redis, named as the broker only.
        extra["CELERY_BROKER_URL"] = request.getfixturevalue("redis_url")
    env = base_env(pg_url, tmp_path, **extra)  # default leader TTL (15 s)
    a = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(lambda: "is now the leader" in a.output(), 20, what="a leads")
    b = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(pg_url, ["warm-up"])
    wait_for(lambda: all_finished(pg_url, 1), 20, what="warm-up finished")

    a.signal_group(signal.SIGKILL)
    killed = time.monotonic()
    insert_rows(pg_url, ["after-kill"])
    wait_for(lambda: pickup_s(pg_url, "after-kill") is not None, 10, interval=0.02)
    gap = pickup_s(pg_url, "after-kill")
    assert gap is not None
    report(f"pickup of a scan inserted as the leader died ({leadership})", gap)
    assert gap < 2.0

    wait_for(lambda: "is now the leader" in b.output(), 40, interval=0.1, what="b leads")
    failover = time.monotonic() - killed
    report(f"maintenance failover after SIGKILL of the leader ({leadership})", failover)
    assert failover < 30.0
    wait_for(lambda: all_finished(pg_url, 2), 20, what="both finished")


def test_the_broker_never_holds_more_than_the_window(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    import redis

    upgrade(pg_url)
    env = base_env(
        pg_url, tmp_path, REDIS_URL=redis_url, SCANQUEUE_TEST_RUN_SECONDS="0.2", **RUNNER
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    registered = wait_for(
        lambda: sql(pg_url, "SELECT slots FROM scanqueue_workers"), 10, what="registration"
    )
    assert [r.slots for r in registered] == [1]  # one slot: the window is the floor, 4
    ids = [f"b{i:03d}" for i in range(30)]
    insert_rows(pg_url, ids)
    client = redis.Redis.from_url(redis_url)
    queue = env["SCANQUEUE_QUEUE"]
    most_in_broker = most_in_flight = 0
    deadline = time.monotonic() + 60
    while not all_finished(pg_url, len(ids)) and time.monotonic() < deadline:
        most_in_broker = max(most_in_broker, int(client.llen(queue)))
        in_flight = sql(
            pg_url,
            "SELECT count(*) AS n FROM scans WHERE status = 'queued' AND dispatched_at IS NOT NULL",
        )[0].n
        most_in_flight = max(most_in_flight, int(in_flight))
        time.sleep(0.05)
    assert all_finished(pg_url, len(ids))
    report("most messages in the broker (window 4)", most_in_broker, "")
    report("most scans dispatched but not started (window 4)", most_in_flight, "")
    assert most_in_flight <= 4 and most_in_broker <= 4
    worker.stop()
    assert sql(pg_url, "SELECT id FROM scanqueue_workers") == []  # removed on clean shutdown


def test_a_lost_message_is_resent_while_the_workers_stay_saturated(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_TEST_RUN_SECONDS="1.0",
        # The plain age rule alone would take a minute: only the evidence that the
        # message is gone (overtaken) can re-send it in time.
        SCANQUEUE_REDISPATCH_AFTER="60",
        **RUNNER,
    )
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    # "lost": marked dispatched but never published — what a broker that dropped its
    # message leaves behind.  Then a backlog that keeps both slots busy.
    sql(
        pg_url,
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, dispatched_at,"
        " dispatch_count) VALUES ('lost', 'queued', '[\"aws\"]', '[]', clock_timestamp(), 1)",
    )
    backlog = [f"s{i:02d}" for i in range(30)]
    insert_rows(pg_url, backlog)
    t0 = time.monotonic()
    wait_for(lambda: pickup_s(pg_url, "lost") is not None, 40, interval=0.1, what="lost started")
    resent_after = time.monotonic() - t0
    report("a lost message re-sent and started, workers saturated", resent_after)
    rows = scan_rows(pg_url)
    still_waiting = [i for i in backlog if rows[i]["status"] == "queued"]
    assert still_waiting, "the workers were not saturated when the lost scan started"
    assert resent_after < 30.0
    wait_for(lambda: all_finished(pg_url, 31), 60, interval=0.2, what="all finished")
