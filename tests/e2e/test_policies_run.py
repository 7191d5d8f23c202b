"""Retries and timeouts with real `celery -A scanqueue worker` processes (docs/reference.md#policies).

A runner that ignores its timeout is terminated after the grace (its pool process
ends and is replaced) and its scan ends ``failed`` "timed out after N s", with
the slot free for the next scan; a flaky runner is retried until it completes.
(PermanentError, RetryLater and the budgets: tests/integration/test_retries.py.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import (
    Proc,
    all_finished,
    base_env,
    insert_rows,
    read_journal,
    scan_rows,
    start_worker,
    upgrade,
    wait_for,
)

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of the worker still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def starts_of(tmp_path: Path, scan_id: str) -> list[dict[str, object]]:
    return [e for e in read_journal(tmp_path) if e["scan_id"] == scan_id and e["kind"] == "start"]


@pytest.mark.postgres
@pytest.mark.redis
def test_a_runner_that_ignores_its_timeout_is_terminated_and_its_scan_fails(
    pg_url: str, redis_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    upgrade(pg_url)
    env = base_env(
        pg_url,
        tmp_path,
        REDIS_URL=redis_url,
        SCANQUEUE_RUNNER="tests.runners:ignoring_runner",
        SCANQUEUE_TEST_RUN_SECONDS="60",
        SCANQUEUE_SCAN_TIMEOUT="2",
        SCANQUEUE_CANCEL_GRACE_SECONDS="1",
        SCANQUEUE_LEASE_SECONDS="10",
    )
    worker = start_worker(procs, env, tmp_path, "--autoscale=1,1")
    insert_rows(pg_url, ["deaf"])
    wait_for(lambda: starts_of(tmp_path, "deaf"), 20, what="the ignoring run started")
    pid = starts_of(tmp_path, "deaf")[0]["pid"]
    assert isinstance(pid, int)
    t0 = time.monotonic()
    wait_for(lambda: scan_rows(pg_url)["deaf"]["status"] != "running", 15, what="timeout")
    took = time.monotonic() - t0
    row = scan_rows(pg_url)["deaf"]
    assert row["status"] == "failed" and row["error"] == "timed out after 2 s"
    assert took < 2 + 1 + 3  # timeout + grace, plus start-up slack; never the lease
    wait_for(lambda: not _alive(pid), 10, what="the ignoring pool process terminated")
    assert not [e for e in read_journal(tmp_path) if e["kind"] == "end"]  # it never returned
    assert worker.proc.poll() is None
    # The slot is free: the next scan runs, in the replacement process.
    insert_rows(pg_url, ["next"])
    wait_for(lambda: starts_of(tmp_path, "next"), 20, what="the next scan started")
    assert starts_of(tmp_path, "next")[0]["pid"] != pid
    assert scan_rows(pg_url)["deaf"]["status"] == "failed"  # a late message changes nothing


def test_retries_then_success_and_permanent_errors_on_a_real_worker(
    tmp_path: Path, procs: list[Proc]
) -> None:
    url = f"sqlite:///{tmp_path}/scans.db"
    upgrade(url)
    env = base_env(
        url,
        tmp_path,
        SCANQUEUE_RUNNER="tests.runners:flaky_runner",
        SCANQUEUE_MAX_RETRIES="2",
        SCANQUEUE_RETRY_BACKOFF="0.2",
        SCANQUEUE_TEST_FAILURES="2",
    )
    start_worker(procs, env, tmp_path, "--autoscale=2,1")
    insert_rows(url, ["flaky"])
    wait_for(lambda: all_finished(url, 1), 60, interval=0.2, what="the flaky scan done")
    row = scan_rows(url)["flaky"]
    assert (row["status"], row["attempts"], row["error"]) == ("completed", 3, None)
    assert [e["attempt"] for e in starts_of(tmp_path, "flaky")] == [1, 2, 3]
