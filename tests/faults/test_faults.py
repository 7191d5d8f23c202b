"""Fault tests: real processes killed, paused, disconnected; every scan must end right.

After each scenario: every scan is in a terminal state, none ran twice at once
(the journal written by tests.runners proves it), none was lost.  Timings are
shortened through the environment (lease 3 s, grace 1 s, leader TTL 2 s,
re-dispatch after 2 s) so the suite stays quick; each recovery time is printed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from scanqueue.config import TASK_NAME
from tests.claimed import mark_dispatched
from tests.conftest import (
    PgServer,
    Proc,
    RedisServer,
    all_finished,
    assert_no_overlaps,
    base_env,
    create_pg_database,
    insert_rows,
    read_journal,
    run_cli,
    scan_rows,
    start_bridge,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

FAST = {
    "SCANQUEUE_LEASE_SECONDS": "3",
    "SCANQUEUE_CANCEL_GRACE_SECONDS": "1",
    "SCANQUEUE_LEADER_TTL": "2",
    "SCANQUEUE_REDISPATCH_AFTER": "2",
    "SCANQUEUE_RUNNER": "tests.runners:journal_runner",
}


def fast_env(db: str, tmp_path: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = base_env(db, tmp_path, **{**FAST, **extra})
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def started(url: str, scan_id: str) -> bool:
    row = scan_rows(url).get(scan_id)
    return bool(row and row["status"] == "running")


def starts_of(tmp_path: Path, scan_id: str) -> list[dict[str, Any]]:
    return [e for e in read_journal(tmp_path) if e["scan_id"] == scan_id and e["kind"] == "start"]


def report(what: str, seconds: float) -> None:
    print(f"\nRECOVERY {what}: {seconds:.2f}s")


def test_sigkill_worker_mid_scan_requeues_and_completes(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="2")
    victim = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["k1"])
    wait_for(lambda: started(pg_url, "k1"), 20, what="k1 running")
    victim.signal_group(signal.SIGKILL)
    t0 = time.monotonic()
    start_worker(procs, env, tmp_path, "--autoscale=1,1")
    wait_for(lambda: all_finished(pg_url, 1), 40, interval=0.1, what="k1 finished")
    report("SIGKILLed worker mid-scan → scan completed elsewhere", time.monotonic() - t0)
    row = scan_rows(pg_url)["k1"]
    assert row["status"] == "completed" and row["attempts"] == 2
    assert_no_overlaps(read_journal(tmp_path))


def test_flushall_with_scans_in_flight_loses_nothing(
    pg_url: str, redis_url: str, redis_server: RedisServer, tmp_path: Path, procs: list[Proc]
) -> None:
    import redis

    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="0.3")
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    ids = [f"fl{i:02d}" for i in range(20)]
    insert_rows(pg_url, ids)
    wait_for(lambda: any(r["status"] != "queued" for r in scan_rows(pg_url).values()), 20)
    redis.Redis.from_url(redis_url).flushall()
    t0 = time.monotonic()
    wait_for(lambda: all_finished(pg_url, 20), 90, interval=0.2, what="all 20 finished")
    report("FLUSHALL with 20 scans in flight → all completed", time.monotonic() - t0)
    assert {r["status"] for r in scan_rows(pg_url).values()} == {"completed"}
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    assert {e["scan_id"] for e in journal if e["kind"] == "start"} == set(ids)


def test_redis_restart_workers_and_bridge_recover_without_restarting(
    pg_url: str, redis_server: RedisServer, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_server.url)
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(pg_url, ["before"])
    wait_for(lambda: all_finished(pg_url, 1), 20)
    redis_server.stop()
    insert_rows(pg_url, ["during"])
    time.sleep(2)
    redis_server.start()
    t0 = time.monotonic()
    insert_rows(pg_url, ["after"])
    wait_for(lambda: all_finished(pg_url, 3), 60, interval=0.2, what="scans after Redis restart")
    report("Redis restart → queued scans completed", time.monotonic() - t0)
    assert worker.proc.poll() is None  # the same worker process carried on
    assert {r["status"] for r in scan_rows(pg_url).values()} == {"completed"}


def test_postgres_restart_bridge_relistens_and_nothing_is_forgotten(
    pg_server: PgServer, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    url = create_pg_database(pg_server.admin_url)
    upgrade(url)
    # A 30 s safety poll: only a working LISTEN (or the catch-up after reconnect)
    # picks rows up quickly.
    env = fast_env(
        url, tmp_path, redis_url, SCANQUEUE_POLL_EVERY="30", SCANQUEUE_TEST_RUN_SECONDS="1"
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(url, ["pre"])
    wait_for(lambda: started(url, "pre"), 20)
    pg_server.stop("fast")
    time.sleep(2)
    pg_server.start()
    t0 = time.monotonic()
    insert_rows(url, ["post"])
    wait_for(lambda: all_finished(url, 2), 60, interval=0.2, what="scans after PostgreSQL restart")
    report("PostgreSQL restart → new row completed", time.monotonic() - t0)
    assert worker.proc.poll() is None
    rows = scan_rows(url)
    assert rows["post"]["status"] == "completed"
    # 'pre' was running across the restart: it completed, or was re-run; never lost.
    assert rows["pre"]["status"] == "completed"
    assert_no_overlaps(read_journal(tmp_path))


def _listen_backend_pids(url: str) -> list[int]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'scanqueue-listen'")
        pids = [r[0] for r in cur.fetchall()]
    conn.close()
    return pids


def test_terminated_listen_backend_is_replaced_and_rows_still_start_fast(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_POLL_EVERY="30")
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(lambda: "is now the leader" in worker.output(), 10)
    old = wait_for(lambda: _listen_backend_pids(pg_url), 20, what="LISTEN connection")
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (old[0],))
    conn.close()
    insert_rows(pg_url, ["while-reconnecting"])
    t0 = time.monotonic()
    wait_for(lambda: all_finished(pg_url, 1), 20, interval=0.05, what="row after LISTEN loss")
    report("LISTEN backend terminated → row started and completed", time.monotonic() - t0)
    new = _listen_backend_pids(pg_url)
    assert new and new != old
    insert_rows(pg_url, ["later"])
    wait_for(lambda: all_finished(pg_url, 2), 5, interval=0.05, what="row via the new LISTEN")


def test_half_open_listen_connection_is_detected_by_the_liveness_ping(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """A LISTEN backend that stops answering (SIGSTOP) looks like a half-open socket."""
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_POLL_EVERY="60")
    worker = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(lambda: "is now the leader" in worker.output(), 10)
    old = wait_for(lambda: _listen_backend_pids(pg_url), 20, what="LISTEN connection")[0]
    time.sleep(0.5)  # let the startup catch-up pass finish
    os.kill(old, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        insert_rows(pg_url, ["half-open"])
        wait_for(
            lambda: all_finished(pg_url, 1), 30, interval=0.1, what="row despite a mute LISTEN"
        )
        report("half-open LISTEN connection → row completed", time.monotonic() - t0)
    finally:
        os.kill(old, signal.SIGCONT)


def test_idle_in_transaction_lock_does_not_stall_other_scans(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_POLL_EVERY="1")
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(pg_url, ["locked"])
    holder = psycopg2.connect(pg_url)  # a session left idle in a transaction
    with holder.cursor() as cur:
        cur.execute("SELECT id FROM scans WHERE id = 'locked' FOR UPDATE")
        ids = [f"free{i}" for i in range(20)]
        insert_rows(pg_url, ids)
        wait_for(
            lambda: all(scan_rows(pg_url)[i]["status"] == "completed" for i in ids),
            30,
            interval=0.2,
            what="scans flowing past the locked row",
        )
    holder.rollback()
    holder.close()
    wait_for(
        lambda: all_finished(pg_url, 21), 20, interval=0.2, what="the locked row once released"
    )


def test_cancel_a_running_scan_stops_a_cooperative_runner_promptly(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="60")
    start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["c1"])
    wait_for(lambda: started(pg_url, "c1"), 20)
    t0 = time.monotonic()
    assert run_cli(env, "cancel", "c1").returncode == 0
    wait_for(
        lambda: any(e["kind"] == "end" for e in read_journal(tmp_path)), 10, what="runner stopped"
    )
    report("cancel → cooperative runner stopped", time.monotonic() - t0)
    end = next(e for e in read_journal(tmp_path) if e["kind"] == "end")
    assert end["stopped"] is True
    row = scan_rows(pg_url)["c1"]
    assert row["status"] == "canceled" and row["error"]
    insert_rows(pg_url, ["after-cancel"])
    wait_for(
        lambda: scan_rows(pg_url)["after-cancel"]["status"] == "running",
        10,
        what="worker free again",
    )


def test_cancel_terminates_a_runner_that_ignores_it_and_replaces_its_process(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(
        pg_url,
        tmp_path,
        redis_url,
        SCANQUEUE_RUNNER="tests.runners:ignoring_runner",
        SCANQUEUE_TEST_RUN_SECONDS="60",
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["stubborn"])
    wait_for(lambda: started(pg_url, "stubborn"), 20)
    pid = starts_of(tmp_path, "stubborn")[0]["pid"]
    t0 = time.monotonic()
    assert run_cli(env, "cancel", "stubborn").returncode == 0
    wait_for(lambda: not _alive(pid), 15, what="stubborn pool process terminated")
    report("cancel → ignoring runner's process terminated", time.monotonic() - t0)
    assert worker.proc.poll() is None
    assert scan_rows(pg_url)["stubborn"]["status"] == "canceled"
    env["SCANQUEUE_TEST_RUN_SECONDS"] = "0"
    insert_rows(pg_url, ["next"])
    wait_for(lambda: starts_of(tmp_path, "next"), 20, what="replacement process runs the next scan")
    assert starts_of(tmp_path, "next")[0]["pid"] != pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of the worker still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_frozen_worker_loses_its_lease_and_cannot_write_its_outcome(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="5")
    start_bridge(procs, env, tmp_path)
    frozen = start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=1,1")
    insert_rows(pg_url, ["zombie"])
    # Freeze only once the runner itself is going (its journal line written).
    wait_for(lambda: starts_of(tmp_path, "zombie"), 20, what="first run started")
    frozen.signal_group(signal.SIGSTOP)
    t0 = time.monotonic()
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=1,1")
    wait_for(
        lambda: len(starts_of(tmp_path, "zombie")) == 2, 30, what="second run after lease loss"
    )
    report("frozen worker → scan re-run elsewhere", time.monotonic() - t0)
    frozen.signal_group(signal.SIGCONT)
    wait_for(lambda: all_finished(pg_url, 1), 30, interval=0.2)
    wait_for(
        lambda: [e for e in read_journal(tmp_path) if e["kind"] == "end" and e["attempt"] == 1], 15
    )
    ends = [e for e in read_journal(tmp_path) if e["kind"] == "end" and e["attempt"] == 1]
    assert ends[0]["stopped"] is True  # the zombie was told to stop on waking
    row = scan_rows(pg_url)["zombie"]
    assert row["status"] == "completed" and row["attempts"] == 2


def _leader_of(workers: list[Proc]) -> Proc:
    found = [w for w in workers if "is now the leader" in w.output()]
    assert len(found) == 1, [w.output()[-500:] for w in workers]
    return found[0]


def test_paused_leader_past_its_ttl_then_resumed_runs_nothing_twice(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="0.2")
    workers = [start_worker(procs, env, tmp_path, "--autoscale=2,2") for _ in range(2)]
    wait_for(lambda: any("is now the leader" in w.output() for w in workers), 10)
    leader = _leader_of(workers)
    standby = next(w for w in workers if w is not leader)
    leader.signal_group(signal.SIGSTOP)
    t0 = time.monotonic()
    insert_rows(pg_url, [f"ps{i}" for i in range(10)])
    wait_for(lambda: "is now the leader" in standby.output(), 15, what="standby takes over")
    report("leader paused → standby leads", time.monotonic() - t0)
    time.sleep(1)
    leader.signal_group(signal.SIGCONT)
    insert_rows(pg_url, [f"pr{i}" for i in range(10)])
    wait_for(lambda: all_finished(pg_url, 20), 60, interval=0.2, what="all 20 finished")
    assert {r["status"] for r in scan_rows(pg_url).values()} == {"completed"}
    journal = read_journal(tmp_path)
    assert_no_overlaps(journal)
    starts = [e["scan_id"] for e in journal if e["kind"] == "start"]
    assert len(starts) == len(set(starts)) == 20


def test_killed_leader_bridge_hands_over_to_a_standby(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url)
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=2,2")
    bridges = [start_bridge(procs, env, tmp_path) for _ in range(2)]
    wait_for(lambda: any("is now the leader" in b.output() for b in bridges), 10)
    leader = _leader_of(bridges)
    standby = next(b for b in bridges if b is not leader)
    leader.signal_group(signal.SIGKILL)
    t0 = time.monotonic()
    insert_rows(pg_url, ["after-leader-death"])
    wait_for(lambda: all_finished(pg_url, 1), 30, interval=0.1, what="scan via the standby")
    report("leader bridge SIGKILLed → scan dispatched by standby", time.monotonic() - t0)
    # Pickup never waited for leadership (every bridge claims); maintenance moves
    # within the lock's TTL.
    wait_for(lambda: "is now the leader" in standby.output(), 10, what="standby leads")


def test_sigterm_leader_releases_at_once(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_LEADER_TTL="30")
    bridges = [start_bridge(procs, env, tmp_path) for _ in range(2)]
    wait_for(lambda: any("is now the leader" in b.output() for b in bridges), 10)
    leader = _leader_of(bridges)
    standby = next(b for b in bridges if b is not leader)
    t0 = time.monotonic()
    leader.stop()
    wait_for(
        lambda: "is now the leader" in standby.output(), 10, what="standby after clean shutdown"
    )
    took = time.monotonic() - t0
    report("leader SIGTERM → standby leads (TTL 30 s)", took)
    assert took < 10


def test_duplicate_messages_from_two_leaders_run_each_scan_once(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    """Correctness never rests on the lock: send every scan three times."""
    from celery import Celery

    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="0.1")
    ids = [f"dup{i}" for i in range(15)]
    insert_rows(pg_url, ids)
    mark_dispatched(pg_url, *ids)  # claimed, as by a bridge: only a claimed scan starts
    publisher = Celery(broker=redis_url)
    for _ in range(3):
        for scan_id in ids:
            publisher.send_task(TASK_NAME, args=(scan_id,), queue=env["SCANQUEUE_QUEUE"])
    start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=3,3")
    wait_for(lambda: all_finished(pg_url, 15), 60, interval=0.2)
    rows = scan_rows(pg_url)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in rows.values())
    starts = [e["scan_id"] for e in read_journal(tmp_path) if e["kind"] == "start"]
    assert sorted(starts) == sorted(ids)


def test_sigterm_lets_a_running_scan_finish_and_leaves_nothing_running(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="2")
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["graceful"])
    wait_for(lambda: started(pg_url, "graceful"), 20)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert scan_rows(pg_url)["graceful"]["status"] == "completed"


def test_max_attempts_fails_a_scan_whose_worker_keeps_dying(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(
        pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="30", SCANQUEUE_MAX_ATTEMPTS="2"
    )
    start_bridge(procs, env, tmp_path)
    insert_rows(pg_url, ["doomed"])
    for attempt in (1, 2):
        worker = start_worker(procs, env, tmp_path, "--without-bridge", "--autoscale=1,1")
        wait_for(
            lambda a=attempt: len(starts_of(tmp_path, "doomed")) == a, 30, what=f"attempt {attempt}"
        )
        worker.signal_group(signal.SIGKILL)
        worker.proc.wait(10)
    wait_for(lambda: all_finished(pg_url, 1), 30, interval=0.2)
    row = scan_rows(pg_url)["doomed"]
    assert row["status"] == "failed" and "worker lost" in row["error"] and row["attempts"] == 2
    from scanqueue.config import Settings
    from scanqueue.observe.event_sinks import build_event_sink

    events = build_event_sink(Settings.from_env(env)).read_after(None, 1000)
    lost = [
        (e.type, e.data.get("attempt"))
        for e in events
        if e.scan_id == "doomed" and e.type in ("scan.requeued", "scan.failed")
    ]
    assert lost == [("scan.requeued", 1), ("scan.failed", 2)]


def test_sqlite_broker_messages_lost_with_a_killed_worker_are_sent_again(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """kombu's SQL transport forgets what a SIGKILLed worker had taken."""
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = fast_env(url, tmp_path, None, SCANQUEUE_TEST_RUN_SECONDS="1")
    victim = start_worker(procs, env, tmp_path, "--autoscale=2,2")
    insert_rows(url, [f"sq{i}" for i in range(6)])
    wait_for(lambda: any(r["status"] == "running" for r in scan_rows(url).values()), 20)
    victim.signal_group(signal.SIGKILL)
    t0 = time.monotonic()
    start_worker(procs, env, tmp_path, "--autoscale=2,2")
    wait_for(lambda: all_finished(url, 6), 90, interval=0.2, what="all SQLite-broker scans")
    report("SQLite broker: worker SIGKILLed → all scans completed", time.monotonic() - t0)
    assert {r["status"] for r in scan_rows(url).values()} == {"completed"}
    assert_no_overlaps(read_journal(tmp_path))


def test_cold_shutdown_hands_interrupted_scans_back_at_once(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = fast_env(
        pg_url, tmp_path, redis_url, SCANQUEUE_TEST_RUN_SECONDS="60", SCANQUEUE_LEASE_SECONDS="60"
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["interrupted"])
    wait_for(lambda: started(pg_url, "interrupted"), 20)
    worker.proc.send_signal(signal.SIGQUIT)  # cold shutdown: running tasks are not waited for
    worker.proc.wait(30)
    row = scan_rows(pg_url)["interrupted"]
    # Not left 'running' for 60 s, and a graceful hand-back spends no crash budget.
    assert row["status"] == "queued" and row["attempts"] == 0
    assert "interrupted by shutdown; re-queued" in worker.output()
    env["SCANQUEUE_TEST_RUN_SECONDS"] = "0"
    start_worker(procs, env, tmp_path, "--autoscale=1,1")
    wait_for(lambda: all_finished(pg_url, 1), 20, interval=0.2)
    assert scan_rows(pg_url)["interrupted"]["attempts"] == 1
