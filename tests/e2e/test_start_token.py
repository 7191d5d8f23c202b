"""A message is a start token, with real workers (docs/reference.md#lifecycle).

A scan of higher priority claimed behind a full dispatch window starts on the next
free slot (the next message's start takes it in place of its own scan, which the
bridge claims again), and with priorities mixed every scan still runs exactly once.

Each measured figure is printed (``-s`` shows them).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Proc,
    all_finished,
    assert_no_overlaps,
    base_env,
    read_journal,
    report,
    sql,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = [pytest.mark.slow]

RUNNER = {"SCANQUEUE_RUNNER": "tests.runners:journal_runner"}
SWAP_LOG = "started by the message of scan"


def insert(url: str, rows: list[tuple[str, int]]) -> None:
    """Plain-SQL inserts (another program's) with a priority each."""
    sql(
        url,
        "INSERT INTO scans (id, status, providers_scanned, frameworks_scanned, priority)"
        " VALUES (:id, 'queued', '[\"aws\"]', '[]', :priority)",
        [{"id": i, "priority": p} for i, p in rows],
    )


@pytest.mark.postgres
@pytest.mark.redis
def test_a_priority_scan_behind_a_backlog_starts_on_the_next_free_slot(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """2 slots of 2 s scans, the default window (4): before, the urgent scan waited for
    the window's messages (about 2 turnovers after its claim); now one slot at most."""
    upgrade(pg_url)
    run_s = 2.0
    env = base_env(
        pg_url, tmp_path, REDIS_URL=redis_url, SCANQUEUE_TEST_RUN_SECONDS=str(run_s), **RUNNER
    )
    insert(pg_url, [(f"bl{i:05d}", 0) for i in range(10_000)])
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(
        lambda: sql(pg_url, "SELECT count(*) FROM scans WHERE status='completed'")[0][0] >= 3,
        60,
        interval=0.2,
        what="the backlog moving",
    )
    t0, inserted_at = time.monotonic(), time.time()
    insert(pg_url, [("urgent", 100)])
    wait_for(
        lambda: sql(pg_url, "SELECT started_at FROM scans WHERE id='urgent'")[0][0] is not None,
        30,
        interval=0.02,
        what="urgent started",
    )
    took = time.monotonic() - t0
    ((claimed_to_started,),) = sql(
        pg_url,
        "SELECT EXTRACT(EPOCH FROM started_at - dispatched_at) FROM scans WHERE id = 'urgent'",
    )
    wait_for(lambda: any(e["scan_id"] == "urgent" for e in read_journal(tmp_path)), 10)
    journal = read_journal(tmp_path)
    (urgent_start,) = [e["t"] for e in journal if e["scan_id"] == "urgent"]
    slot_freed = min(e["t"] for e in journal if e["kind"] == "end" and e["t"] > inserted_at)
    report("priority scan behind 10,000 queued (2 slots, 2 s scans) started after", took)
    report("of which from its claim to its start", float(claimed_to_started))
    report("from the first slot freed after its insert to its start", urgent_start - slot_freed)
    # Its claim waits for the next start, then its start for the next free slot:
    # within one scan's run of a slot freeing (before: the window's 4 messages went
    # first, 2 runs after the claim).
    assert urgent_start - slot_freed < run_s + 0.75
    assert float(claimed_to_started) < run_s + 0.75
    wait_for(lambda: SWAP_LOG in worker.output(), 10, what="the swap logged")
    # The scan whose message started it was released, not lost: it is queued again.
    sql(pg_url, "UPDATE scans SET status='canceled' WHERE status='queued'")
    wait_for(
        lambda: sql(pg_url, "SELECT count(*) FROM scans WHERE status='running'")[0][0] == 0,
        15,
        what="the running scans finished",
    )
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    starts = [e["scan_id"] for e in journal if e["kind"] == "start"]
    assert len(starts) == len(set(starts)) and "urgent" in starts
    assert sql(pg_url, "SELECT max(attempts) FROM scans")[0][0] == 1


def test_with_priorities_mixed_every_scan_runs_exactly_once(
    db_url: str, tmp_path: Path, procs: list[Proc], request: pytest.FixtureRequest
) -> None:
    """Rows of random priorities arrive in waves while the workers run: messages start
    other scans in place of their own many times, and each scan still runs once."""
    upgrade(db_url)
    extra = {"SCANQUEUE_TEST_RUN_SECONDS": "0.05", "SCANQUEUE_REDISPATCH_AFTER": "2"}
    if db_url.startswith("postgresql"):
        extra["REDIS_URL"] = request.getfixturevalue("redis_url")
    # On PostgreSQL the waves come faster than two slots run them (about 150 rows a
    # second against 40), so later waves' higher priorities are dispatched behind
    # lower ones whatever the machine's speed: messages then start other scans.
    waves, per_wave, gap_s = (10, 15, 0.1) if db_url.startswith("postgresql") else (6, 10, 0.3)
    env = base_env(db_url, tmp_path, **RUNNER, **extra)
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    rng = random.Random(7)
    ids: list[str] = []
    for wave in range(waves):
        rows = [(f"w{wave:02d}-{k:02d}", rng.choice((0, 0, 1, 2, 5))) for k in range(per_wave)]
        insert(db_url, rows)
        ids += [scan_id for scan_id, _ in rows]
        time.sleep(gap_s)
    wait_for(lambda: all_finished(db_url, len(ids)), 180, interval=0.5, what="all done")
    rows = sql(db_url, "SELECT id, status, attempts FROM scans")
    assert {r.id for r in rows} == set(ids)
    assert all(r.status == "completed" and r.attempts == 1 for r in rows), rows
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    starts = sorted(e["scan_id"] for e in journal if e["kind"] == "start")
    assert starts == sorted(ids)
    swaps = worker.output().count(SWAP_LOG)
    report(f"messages that started another scan ({len(ids)} scans)", swaps, "")
    if db_url.startswith("postgresql"):
        # On SQLite the broker's 0.1 s poll lets the bridge's claim swap put the
        # messages in priority order first, so a start swap may never be needed.
        assert swaps > 0
