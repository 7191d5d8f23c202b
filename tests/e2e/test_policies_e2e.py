"""Scan policies with real workers (docs/reference.md#policies): per-key limits journalled across many
keys, a SIGKILLed worker's key slot freed by the reaper, a high-priority scan behind a
10,000-row backlog, and a pause that outlives a bridge restart.

Each measured figure is printed (``-s`` shows them).
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from scanqueue.config import Settings
from scanqueue.observe.event_sinks import build_event_sink
from tests.conftest import (
    Proc,
    all_finished,
    assert_no_overlaps,
    base_env,
    read_journal,
    report,
    run_cli,
    scan_rows,
    sql,
    start_bridge,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = [pytest.mark.slow]

RUNNER = {"SCANQUEUE_RUNNER": "tests.runners:journal_runner"}
FAST = {
    "SCANQUEUE_LEASE_SECONDS": "3",
    "SCANQUEUE_CANCEL_GRACE_SECONDS": "1",
    "SCANQUEUE_LEADER_TTL": "2",
    "SCANQUEUE_REDISPATCH_AFTER": "2",
}


def insert_keyed(url: str, rows: list[tuple[str, str]], **columns: Any) -> None:
    """Plain-SQL inserts (another program's) naming a scan_key; extra columns as given."""
    names = "".join(f", {c}" for c in columns)
    values = "".join(f", :{c}" for c in columns)
    sql(
        url,
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, scan_key"
        f"{names}) VALUES (:id, 'queued', '[\"aws\"]', '[]', :key{values})",
        [{"id": i, "key": k, **columns} for i, k in rows],
    )


def most_running_per_key(journal: list[dict[str, Any]], key_of: dict[str, str]) -> dict[str, int]:
    """The most runs of each key open at once, from the journal's starts and ends."""
    points: list[tuple[float, int, str]] = []
    for e in journal:
        if e["kind"] in ("start", "end"):
            points.append((e["t"], 1 if e["kind"] == "start" else -1, key_of[e["scan_id"]]))
    points.sort(key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    running: dict[str, int] = defaultdict(int)
    most: dict[str, int] = defaultdict(int)
    for _, step, key in points:
        running[key] += step
        most[key] = max(most[key], running[key])
    return dict(most)


def env_for(db_url: str, tmp_path: Path, request: pytest.FixtureRequest, **extra: str) -> Any:
    if db_url.startswith("postgresql"):
        extra["REDIS_URL"] = request.getfixturevalue("redis_url")
    return base_env(db_url, tmp_path, **{**RUNNER, **extra})


@pytest.mark.parametrize(
    ("run_s", "per_key"),
    # Short runs: the window turns over hundreds of times a second, and every claim
    # judges the limits against scans that start and end meanwhile.
    [("0.3", 4), ("0.005", 25)],
    ids=["runs-300ms", "runs-5ms"],
)
def test_per_key_limits_hold_across_many_keys(
    db_url: str,
    tmp_path: Path,
    procs: list[Proc],
    request: pytest.FixtureRequest,
    run_s: str,
    per_key: int,
) -> None:
    upgrade(db_url)
    env = env_for(
        db_url,
        tmp_path,
        request,
        SCANQUEUE_TEST_RUN_SECONDS=run_s,
        SCANQUEUE_MAX_RUNNING_PER_KEY="1",
    )
    assert run_cli(env, "limits", "set", "acct-2", "2").returncode == 0
    keys = ("acct-0", "acct-1", "acct-2", "acct-3")
    rows = [(f"{k}-{i}", k) for i in range(per_key) for k in keys]
    insert_keyed(db_url, rows)
    start_worker(procs, env, tmp_path, "--autoscale=6,6")
    wait_for(lambda: all_finished(db_url, len(rows)), 90, interval=0.2, what="all finished")
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    most = most_running_per_key(journal, dict(rows))
    print(f"\nMEASURED most running per key: {most}")
    assert most["acct-0"] == most["acct-1"] == most["acct-3"] == 1
    assert most["acct-2"] <= 2
    assert sum(most.values()) >= 4  # the keys did run side by side
    assert {r["status"] for r in scan_rows(db_url).values()} == {"completed"}
    # Plain-SQL rows were seen: each has its key, and each sent scan.queued.
    keys = dict(sql(db_url, "SELECT id, effective_key FROM scans"))
    assert keys == dict(rows)
    sink = build_event_sink(Settings.from_env(env))
    queued = {e.data["scan_id"] for e in sink.read_after(None, 1000) if e.type == "scan.queued"}
    assert queued == {i for i, _ in rows}


def test_a_sigkilled_worker_frees_its_keys_slot_when_the_reaper_acts(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_TEST_RUN_SECONDS="2",
        SCANQUEUE_MAX_RUNNING_PER_KEY="1",
        **RUNNER,
        **FAST,
    )
    victim = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_keyed(pg_url, [("first", "acct")])
    wait_for(lambda: scan_rows(pg_url)["first"]["status"] == "running", 20, what="running")
    insert_keyed(pg_url, [("second", "acct")])
    victim.signal_group(signal.SIGKILL)
    killed = time.monotonic()
    killed_wall = time.time()  # the journal's clock
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(lambda: all_finished(pg_url, 2), 60, interval=0.1, what="both finished")
    report("SIGKILL mid-scan → both scans of the key finished", time.monotonic() - killed)
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    # Killed run open-ended; afterwards never two of the key at once.
    after = [e for e in journal if e["t"] > killed_wall]
    assert most_running_per_key(after, {"first": "acct", "second": "acct"}).get("acct", 0) <= 1
    rows = scan_rows(pg_url)
    assert rows["first"]["status"] == rows["second"]["status"] == "completed"


def test_a_high_priority_scan_starts_within_one_turnover_behind_10000(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    run_s = 1.0
    env = base_env(
        pg_url, tmp_path, REDIS_URL=redis_url, SCANQUEUE_TEST_RUN_SECONDS=str(run_s), **RUNNER
    )
    backlog = [(f"bl{i:05d}", f"acct-{i % 50}") for i in range(10_000)]
    insert_keyed(pg_url, backlog)
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(
        lambda: sql(pg_url, "SELECT count(*) FROM scans WHERE status='completed'")[0][0] >= 4,
        60,
        interval=0.2,
        what="the backlog moving",
    )
    t0 = time.monotonic()
    insert_keyed(pg_url, [("urgent", "acct-urgent")], priority=100)
    wait_for(
        lambda: scan_rows(pg_url)["urgent"]["started_at"] is not None,
        30,
        interval=0.02,
        what="urgent started",
    )
    took = time.monotonic() - t0
    report("high-priority scan behind 10,000 queued started after", took)
    # Two slots of 1 s runs: a slot frees within 1 s; the window (≥4) of earlier
    # dispatches may go first, so allow a few turnovers — never the backlog's hours.
    assert took < 3 * run_s + 1.0
    sql(pg_url, "UPDATE scans SET status='canceled' WHERE status='queued'")


def test_pause_holds_across_a_bridge_restart_and_resume_releases(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url, tmp_path, REDIS_URL=redis_url, SCANQUEUE_TEST_RUN_SECONDS="0.05", **RUNNER
    )
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=2,2")
    bridge = start_bridge(procs, env, tmp_path)
    assert run_cli(env, "pause", "acct-a").returncode == 0
    insert_keyed(pg_url, [("a1", "acct-a"), ("b1", "acct-b")])
    wait_for(lambda: scan_rows(pg_url)["b1"]["status"] == "completed", 20, what="b1 done")
    assert run_cli(env, "pause").returncode == 0
    insert_keyed(pg_url, [("b2", "acct-b")])
    bridge.stop()
    start_bridge(procs, env, tmp_path)
    time.sleep(2.0)  # several polls and NOTIFYs: nothing may be claimed
    rows = scan_rows(pg_url)
    assert rows["a1"]["status"] == rows["b2"]["status"] == "queued"
    assert (
        sql(
            pg_url,
            "SELECT count(*) FROM scans WHERE dispatched_at IS NOT NULL AND status = 'queued'",
        )[0][0]
        == 0
    )
    assert run_cli(env, "resume").returncode == 0
    wait_for(lambda: scan_rows(pg_url)["b2"]["status"] == "completed", 20, what="b2 done")
    assert scan_rows(pg_url)["a1"]["status"] == "queued"  # its key is still paused
    assert run_cli(env, "resume", "acct-a").returncode == 0
    wait_for(lambda: all_finished(pg_url, 3), 20, what="a1 done")
