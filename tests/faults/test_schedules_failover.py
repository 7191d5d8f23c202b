"""Schedules with real bridges and workers (docs/reference.md#schedules): exactly once across failovers.

* PostgreSQL + Redis (the Redis lock): a schedule every 2 s runs for ~40 s
  while the leader bridge is SIGKILLed twice; every fire time makes at most one
  scan, runs once, and only the failovers leave gaps (each closed by one
  catch-up).  The fire-time precision (``scheduled_for`` → the row's
  ``created_at``) is printed as PRECISION lines.
* SQLite (the lease row): the only bridge is frozen (SIGSTOP) across three
  fire times and thawed late in a period: ``on_missed=once`` makes one catch-up
  scan, ``skip`` none.
* SQLite: ``on_overlap=skip`` with a runner slower than the period never has
  two scans of the schedule at once, and says so with ``schedule.skipped``.
"""

from __future__ import annotations

import itertools
import signal
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from scanqueue.config import normalize_database_url
from tests.conftest import (
    Proc,
    assert_no_overlaps,
    base_env,
    read_journal,
    run_cli,
    start_bridge,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = [pytest.mark.slow]

FAST = {
    "SCANQUEUE_LEASE_SECONDS": "3",
    "SCANQUEUE_CANCEL_GRACE_SECONDS": "1",
    "SCANQUEUE_LEADER_TTL": "2",
    "SCANQUEUE_REDISPATCH_AFTER": "2",
    "SCANQUEUE_RUNNER": "tests.runners:journal_runner",
}
LEADER = "is now the leader"


def _query(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(normalize_database_url(url))
    try:
        with engine.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _scheduled(url: str, name: str) -> list[dict[str, Any]]:
    rows = _query(
        url,
        "SELECT id, status, created_at, scheduled_for FROM scans WHERE schedule_name = :name"
        " ORDER BY scheduled_for",
        name=name,
    )
    for row in rows:  # SQLite hands back text; make both aware UTC datetimes
        for col in ("created_at", "scheduled_for"):
            value = row[col]
            if isinstance(value, str):
                value = datetime.fromisoformat(value)
            row[col] = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return rows


def _add(env: dict[str, str], name: str, *args: str) -> None:
    out = run_cli(env, "schedules", "add", name, "--provider", "aws", *args)
    assert out.returncode == 0, out.stderr


def _pause(env: dict[str, str], name: str) -> None:
    assert run_cli(env, "schedules", "pause", name).returncode == 0


def _all_done(url: str, name: str) -> bool:
    return all(r["status"] in ("completed", "failed", "canceled") for r in _scheduled(url, name))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(240)
def test_every_2s_fires_each_time_once_while_the_leader_is_killed_twice(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(pg_url, tmp_path, REDIS_URL=redis_url, **FAST)
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=4,4")
    bridges = [start_bridge(procs, env, tmp_path) for _ in range(3)]
    wait_for(lambda: any(LEADER in b.output() for b in bridges), 15, what="a leader")
    _add(env, "every2", "--every", "2", "--on-overlap", "queue")
    kills: list[float] = []
    for _ in range(2):
        time.sleep(10)
        [leader] = [b for b in bridges if b.alive() and LEADER in b.output()]
        leader.signal_group(signal.SIGKILL)
        kills.append(time.time())
        bridges.remove(leader)
        t0 = time.monotonic()
        wait_for(lambda: any(LEADER in b.output() for b in bridges), 30, what="a new leader")
        print(f"\nRECOVERY leader SIGKILLed → new leader: {time.monotonic() - t0:.2f}s")
    time.sleep(10)
    _pause(env, "every2")
    wait_for(lambda: _all_done(pg_url, "every2"), 60, interval=0.2, what="scans finished")

    rows = _scheduled(pg_url, "every2")
    fires = [r["scheduled_for"] for r in rows]
    assert len(fires) == len(set(fires)), "two scans for one fire time"
    assert all(f.timestamp() % 2 == 0 for f in fires), "fire times off the 2 s grid"
    assert all(r["status"] == "completed" for r in rows)
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    starts = [e["scan_id"] for e in journal if e["kind"] == "start"]
    assert sorted(starts) == sorted(r["id"] for r in rows), "each scan runs exactly once"
    # Only the failovers leave gaps, each closed by one catch-up (on_missed=once).
    grid = int((fires[-1] - fires[0]).total_seconds() // 2) + 1
    missing = grid - len(fires)
    print(f"\nSCHEDULE {len(fires)} scans over {grid} fire times; {missing} missed in 2 failovers")
    assert len(fires) >= 15
    assert missing <= 2 * 8  # ≤ 8 fire times (16 s) per failover, far more than seen
    for kill in kills:  # the fire times around each kill: none twice (asserted above), and
        after = [f for f in fires if f.timestamp() > kill]  # firing goes on afterwards
        assert after and after[0].timestamp() - kill < 20

    on_time = [
        (r["created_at"] - r["scheduled_for"]).total_seconds()
        for prev, r in itertools.pairwise(rows)
        if r["scheduled_for"] - prev["scheduled_for"] == timedelta(seconds=2)
    ]
    print(
        f"\nPRECISION fire time → scan row (PostgreSQL, {len(on_time)} on-time fires):"
        f" p50 {statistics.median(on_time):.3f}s p99 {_percentile(on_time, 0.99):.3f}s"
        f" max {max(on_time):.3f}s"
    )
    assert _percentile(on_time, 0.99) < 2.0


@pytest.mark.timeout(180)
def test_three_missed_fire_times_make_one_catch_up_or_none(
    sqlite_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(sqlite_url)
    env = base_env(sqlite_url, tmp_path, **FAST)
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=2,2")
    bridge = start_bridge(procs, env, tmp_path)
    wait_for(lambda: LEADER in bridge.output(), 15, what="the leader")
    for name, policy in (("once", "once"), ("skip", "skip")):
        _add(env, name, "--every", "6", "--on-missed", policy, "--on-overlap", "queue")
    # Let each fire on time once, then freeze the only bridge early in a period (after
    # that period's fire) …
    wait_for(lambda: _scheduled(sqlite_url, "once") and _scheduled(sqlite_url, "skip"), 20)
    wait_for(lambda: 1.5 <= time.time() % 6 < 2.5, 7, interval=0.02, what="early in a period")
    bridge.signal_group(signal.SIGSTOP)
    frozen_at = datetime.now(UTC)
    # … across three fire times, thawing it 3.5 s into a period: more than half the
    # period (the grace) has gone by since the last one, so all three were missed.
    time.sleep(17)
    wait_for(lambda: 3.5 <= time.time() % 6 < 3.9, 7, interval=0.02, what="late in a period")
    bridge.signal_group(signal.SIGCONT)
    thawed_at = datetime.now(UTC)
    time.sleep(4)  # the thawed leader's first ticks, before the next fire time
    for name in ("once", "skip"):
        _pause(env, name)
    missed = {
        name: [
            r["scheduled_for"]
            for r in _scheduled(sqlite_url, name)
            if frozen_at < r["scheduled_for"] <= thawed_at
        ]
        for name in ("once", "skip")
    }
    fire_times = int((thawed_at - frozen_at).total_seconds() // 6)
    assert fire_times >= 3, fire_times
    assert len(missed["once"]) == 1, missed
    assert missed["once"][0] > thawed_at - timedelta(seconds=6)  # the latest missed one
    assert missed["skip"] == [], missed
    skipped = _query(
        sqlite_url, "SELECT payload FROM scanqueue_events WHERE type = 'schedule.skipped'"
    )
    assert any("on_missed=skip" in str(e["payload"]) for e in skipped)


@pytest.mark.timeout(180)
def test_overlap_skip_never_runs_two_scans_of_a_schedule_at_once(
    sqlite_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(sqlite_url)
    env = base_env(sqlite_url, tmp_path, **{**FAST, "SCANQUEUE_TEST_RUN_SECONDS": "5"})
    start_worker(procs, env, tmp_path, "--autoscale=4,4")  # with its embedded bridge
    _add(env, "slow", "--every", "2")  # on_overlap=skip is the default
    time.sleep(16)
    _pause(env, "slow")
    wait_for(lambda: _all_done(sqlite_url, "slow"), 30, interval=0.2, what="scans finished")
    rows = _scheduled(sqlite_url, "slow")
    journal = [e for e in read_journal(tmp_path) if e["scan_id"] in {r["id"] for r in rows}]
    spans = sorted(
        (start["t"], end["t"])
        for start in journal
        if start["kind"] == "start"
        for end in journal
        if end["kind"] == "end" and end["scan_id"] == start["scan_id"]
    )
    assert 2 <= len(spans) <= 4, spans  # 16 s of 5 s runs, every 2 s: most fire times skipped
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= end - 0.05, "two scans of the schedule ran at once"
    skipped = _query(
        sqlite_url, "SELECT payload FROM scanqueue_events WHERE type = 'schedule.skipped'"
    )
    assert len(skipped) >= 3
    assert all("still queued or running" in str(e["payload"]) for e in skipped)
