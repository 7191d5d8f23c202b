"""Retries and timeouts on the run side (docs/reference.md#policies), against SQLite and PostgreSQL.

execute_scan with real runners and a real database: retry then success, retries
exhausted, PermanentError, RetryLater(after=…), the reaper's separate budget, and
timeouts with a cooperative runner and with one that ignores the stop.  A run told
to stop for a timeout never completes, whatever its runner returns.
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from scanqueue import Job, PermanentError, RetryLater, ScanContext, ScanResult
from scanqueue.db.rows import FinishedRun
from scanqueue.db.store import Store
from scanqueue.observe.metrics import MetricsObserver
from scanqueue.observe.observer import RunInfo, SafeObservers
from scanqueue.runners.api import RunnerFunc
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from tests.claimed import mark_dispatched
from tests.integration.test_store import insert_raw

RETRYING = ExecutionSettings(
    heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5, max_retries=2, retry_backoff_s=0
)


class Recorder:
    """A ScanObserver that writes down the events of each run."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ended: list[str] = []

    def started(self, run: RunInfo) -> None:
        self.events.append(("scan.started", {"attempt": run.attempt}))

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        self.events.append((event_type, {**payload, "attempt": run.attempt}))

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        self.ended.append(row.status)

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        self.ended.append("discarded")

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [p for t, p in self.events if t == event_type]


def run(
    store: Store,
    scan_id: str,
    fn: Any,
    settings: ExecutionSettings = RETRYING,
    observer: Any = None,
) -> Outcome:
    mark_dispatched(store, scan_id)  # claimed, as a bridge does before each message
    return execute_scan(
        scan_id,
        store=store,
        runner=RunnerFunc(fn),
        settings=settings,
        **({"observer": observer} if observer is not None else {}),
    )


def column(store: Store, scan_id: str, name: str) -> Any:
    with store.engine.begin() as conn:
        return conn.execute(
            text(f"SELECT {name} FROM scans WHERE id = :id"), {"id": scan_id}
        ).scalar_one()


def set_columns(store: Store, scan_id: str, **values: Any) -> None:
    assigns = ", ".join(f"{k} = :{k}" for k in values)
    with store.engine.begin() as conn:
        conn.execute(text(f"UPDATE scans SET {assigns} WHERE id = :id"), {"id": scan_id, **values})


def run_after(store: Store, scan_id: str) -> datetime:
    value = column(store, scan_id, "run_after")
    if isinstance(value, str):  # SQLite text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def db_now(store: Store) -> datetime:
    sql = (
        "SELECT clock_timestamp()"
        if store.dialect == "postgresql"
        else ("SELECT strftime('%Y-%m-%d %H:%M:%f','now')")
    )
    with store.engine.begin() as conn:
        value = conn.execute(text(sql)).scalar_one()
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def flaky(failures: int) -> Any:
    """A runner that raises ``failures`` times, then completes with 3 findings."""
    calls: list[int] = []

    def fn(job: Job, ctx: ScanContext) -> ScanResult:
        calls.append(job.attempt)
        if len(calls) <= failures:
            raise RuntimeError(f"provider aws: throttled (call {len(calls)})")
        return ScanResult(findings_count=3)

    return fn


# -- retries ---------------------------------------------------------------------------


def test_a_failed_run_is_retried_then_completes(store: Store) -> None:
    insert_raw(store, "flaky")
    fn, rec = flaky(2), Recorder()
    assert run(store, "flaky", fn, observer=rec) is Outcome.RETRYING
    row = store.get("flaky")
    assert row.status == "queued" and row.error == "provider aws: throttled (call 1)"
    assert column(store, "flaky", "retries") == 1 and row.attempts == 1
    assert column(store, "flaky", "dispatched_at") is None
    assert column(store, "flaky", "worker_id") is None
    assert run(store, "flaky", fn, observer=rec) is Outcome.RETRYING
    assert run(store, "flaky", fn, observer=rec) is Outcome.COMPLETED
    row = store.get("flaky")
    assert (row.status, row.findings_count, row.attempts, row.error) == ("completed", 3, 3, None)
    assert column(store, "flaky", "retries") == 2
    retrying = rec.of("scan.retrying")
    assert [(e["attempt"], e["retries"]) for e in retrying] == [(1, 1), (2, 2)]
    assert retrying[0]["error"] == "provider aws: throttled (call 1)"
    assert retrying[0]["delay_s"] == 0 and retrying[0]["run_after"]
    assert rec.ended == ["discarded", "discarded", "completed"]


def test_retries_exhausted_fail_the_scan_with_the_last_error(store: Store) -> None:
    insert_raw(store, "hopeless")
    fn = flaky(99)
    outcomes = [run(store, "hopeless", fn) for _ in range(3)]
    assert outcomes == [Outcome.RETRYING, Outcome.RETRYING, Outcome.FAILED]
    row = store.get("hopeless")
    assert row.status == "failed" and row.error == "provider aws: throttled (call 3)"
    assert (row.attempts, column(store, "hopeless", "retries")) == (3, 2)
    assert run(store, "hopeless", fn) is Outcome.SKIPPED  # nothing more to run


def test_a_permanent_error_fails_at_once_with_retries_left(store: Store) -> None:
    insert_raw(store, "perm")

    def denied(job: Job, ctx: ScanContext) -> None:
        raise PermanentError("provider aws: access denied")

    assert run(store, "perm", denied) is Outcome.FAILED
    row = store.get("perm")
    assert row.status == "failed" and row.error == "provider aws: access denied"
    assert column(store, "perm", "retries") == 0


def test_without_max_retries_a_failure_fails_as_before(store: Store) -> None:
    insert_raw(store, "plain")
    settings = ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5)
    assert run(store, "plain", flaky(1), settings) is Outcome.FAILED
    assert store.get("plain").status == "failed"


def test_retry_later_sets_run_after_to_the_delay_it_asked_for(store: Store) -> None:
    insert_raw(store, "later")
    set_columns(store, "later", seen_at=datetime(2026, 1, 2, tzinfo=UTC))
    rec = Recorder()

    def throttled(job: Job, ctx: ScanContext) -> None:
        raise RetryLater("API rate limit, resets in 2 minutes", after=120)

    before = db_now(store)
    assert run(store, "later", throttled, observer=rec) is Outcome.RETRYING
    after = db_now(store)
    due = run_after(store, "later")
    assert before + timedelta(seconds=119.9) <= due <= after + timedelta(seconds=120.1)
    row = store.get("later")
    assert row.status == "queued" and row.error == "API rate limit, resets in 2 minutes"
    assert column(store, "later", "seen_at") is not None  # no second scan.queued
    (event,) = rec.of("scan.retrying")
    assert event["delay_s"] == 120 and event["error"] == row.error


def test_retry_later_without_retries_left_fails_with_its_reason(store: Store) -> None:
    insert_raw(store, "later-no")
    settings = ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5)

    def throttled(job: Job, ctx: ScanContext) -> None:
        raise RetryLater("busy", after=5)

    assert run(store, "later-no", throttled, settings) is Outcome.FAILED
    assert store.get("later-no").error == "busy"


def test_backoff_grows_from_the_base(store: Store) -> None:
    insert_raw(store, "backoff")
    settings = ExecutionSettings(
        heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5, max_retries=3, retry_backoff_s=100
    )
    fn = flaky(99)
    assert run(store, "backoff", fn, settings) is Outcome.RETRYING
    first = run_after(store, "backoff") - db_now(store)
    assert timedelta(seconds=49) <= first <= timedelta(seconds=100.5)
    set_columns(store, "backoff", run_after=None)
    assert run(store, "backoff", fn, settings) is Outcome.RETRYING
    second = run_after(store, "backoff") - db_now(store)
    assert timedelta(seconds=99) <= second <= timedelta(seconds=200.5)


def test_the_reaper_does_not_count_retried_runs_as_lost_workers(store: Store) -> None:
    insert_raw(store, "survivor")
    fn = flaky(99)
    assert run(store, "survivor", fn) is Outcome.RETRYING
    assert run(store, "survivor", fn) is Outcome.RETRYING
    # The third run's worker dies: 3 runs started, but only this one was lost.
    mark_dispatched(store, "survivor")
    assert store.start_run("survivor", "doomed/1") is not None
    time.sleep(0.01)  # SQLite's clock has milliseconds: a lease of 0 needs one to pass
    reaped = store.reap_orphans(lease_s=0, max_attempts=2)
    assert [(r.scan_id, r.requeued) for r in reaped] == [("survivor", True)]
    row = store.get("survivor")
    assert (row.status, row.attempts, column(store, "survivor", "retries")) == ("queued", 3, 2)
    # A second lost run spends the crash budget: failed as a lost worker.
    mark_dispatched(store, "survivor")
    assert store.start_run("survivor", "doomed/2") is not None
    time.sleep(0.01)
    reaped = store.reap_orphans(lease_s=0, max_attempts=2)
    assert [(r.scan_id, r.requeued) for r in reaped] == [("survivor", False)]
    assert (store.get("survivor").error or "").startswith("worker lost")


def test_a_graceful_hand_back_spends_neither_budget(store: Store) -> None:
    insert_raw(store, "handed")
    assert run(store, "handed", flaky(99)) is Outcome.RETRYING
    mark_dispatched(store, "handed")
    assert store.start_run("handed", "shutting/1") is not None
    assert store.hand_back("shutting") == ["handed"]
    row = store.get("handed")
    assert (row.status, row.attempts, column(store, "handed", "retries")) == ("queued", 1, 1)


def test_a_stale_run_cannot_retry_over_a_newer_one(store: Store) -> None:
    insert_raw(store, "stale")
    mark_dispatched(store, "stale")
    started = store.start_run("stale", "w/1")
    assert started is not None
    store.reap_orphans(lease_s=0, max_attempts=3)  # the lease went elsewhere
    mark_dispatched(store, "stale")
    newer = store.start_run("stale", "w/2")
    assert newer is not None and newer.attempt == 2
    assert store.retry_run("stale", 1, error="late", delay_s=1, worker_id="w/1") is None
    assert store.get("stale").status == "running" and column(store, "stale", "retries") == 0


# -- timeouts ------------------------------------------------------------------------


def timeouts(**kw: Any) -> ExecutionSettings:
    return ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5, **kw)


def test_a_cooperative_run_past_its_timeout_fails_and_never_completes(store: Store) -> None:
    insert_raw(store, "slow")
    rec = Recorder()
    told: list[str | None] = []

    def patient(job: Job, ctx: ScanContext) -> ScanResult:
        ctx.wait(30)
        told.append(ctx.stop_reason)
        return ScanResult(findings_count=7)  # ignored: a run told to stop never completes

    t0 = time.monotonic()
    assert run(store, "slow", patient, timeouts(scan_timeout_s=0.5), rec) is Outcome.FAILED
    assert 0.45 <= time.monotonic() - t0 < 3
    row = store.get("slow")
    assert row.status == "failed" and row.error == "timed out after 0.5 s"
    assert row.findings_count == 0 and told == ["timed out after 0.5 s"]
    assert rec.of("scan.timed_out") == [{"timeout_s": 0.5, "attempt": 1}]
    assert rec.ended == ["failed"]


def test_the_rows_timeout_seconds_wins_over_the_setting(store: Store) -> None:
    insert_raw(store, "own", timeout_seconds=1)
    t0 = time.monotonic()
    outcome = run(store, "own", lambda job, ctx: ctx.wait(30), timeouts(scan_timeout_s=60))
    assert outcome is Outcome.FAILED and 0.9 <= time.monotonic() - t0 < 4
    assert store.get("own").error == "timed out after 1 s"
    insert_raw(store, "quick", timeout_seconds=10)
    assert run(store, "quick", lambda job, ctx: None, timeouts(scan_timeout_s=0.1)) is (
        Outcome.COMPLETED
    )


def test_a_timed_out_run_is_retried_like_any_failure(store: Store) -> None:
    insert_raw(store, "retimed", timeout_seconds=1)
    rec = Recorder()
    settings = timeouts(max_retries=1, retry_backoff_s=0)
    assert run(store, "retimed", lambda j, c: c.wait(30), settings, rec) is Outcome.RETRYING
    row = store.get("retimed")
    assert row.status == "queued" and row.error == "timed out after 1 s"
    assert rec.of("scan.retrying")[0]["error"] == "timed out after 1 s"
    assert len(rec.of("scan.timed_out")) == 1
    assert run(store, "retimed", lambda j, c: None, settings, rec) is Outcome.COMPLETED


def test_a_run_that_ignores_its_timeout_is_ended_after_the_grace(store: Store) -> None:
    """Not in a prefork child, the run cannot be killed: the scan still ends failed
    once the grace is over (its slot freed), and what the runner returns later is
    discarded."""
    insert_raw(store, "deaf")
    release = threading.Event()
    settings = timeouts(scan_timeout_s=0.5)

    def deaf(job: Job, ctx: ScanContext) -> ScanResult:
        release.wait(30)  # never looks at ctx
        return ScanResult(findings_count=5)

    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.append(run(store, "deaf", deaf, settings)))
    t0 = time.monotonic()
    t.start()
    deadline = time.monotonic() + 10
    # Queued until the thread's run starts it (a loaded machine may take a while).
    while store.get("deaf").status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    ended_after = time.monotonic() - t0
    row = store.get("deaf")
    assert row.status == "failed" and row.error == "timed out after 0.5 s"
    assert 0.5 + settings.cancel_grace_s - 0.1 <= ended_after < 4
    release.set()
    t.join(10)
    assert result == [Outcome.LOST]  # the runner's late result changes nothing
    row = store.get("deaf")
    assert row.status == "failed" and row.findings_count == 0


def test_timeouts_and_retries_are_counted(store: Store) -> None:
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    metrics = SafeObservers([MetricsObserver()])
    retries0, timeouts0 = value("scanqueue_retries_total"), value("scanqueue_timeouts_total")
    insert_raw(store, "counted", timeout_seconds=1)
    settings = timeouts(max_retries=1, retry_backoff_s=0)
    assert run(store, "counted", lambda j, c: c.wait(30), settings, metrics) is Outcome.RETRYING
    assert run(store, "counted", flaky(1), settings, metrics) is Outcome.FAILED
    assert value("scanqueue_retries_total") == retries0 + 1
    assert value("scanqueue_timeouts_total") == timeouts0 + 1


@pytest.mark.parametrize("timeout", [None, 0])
def test_no_timeout_by_default_or_with_zero(store: Store, timeout: int | None) -> None:
    insert_raw(store, "free", timeout_seconds=timeout)
    assert run(store, "free", lambda j, c: c.wait(0.7), timeouts()) is Outcome.COMPLETED


# -- the real runner -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"command": ["/nonexistent/scanner-xyz"]}, "scanner-xyz"),
        ({"command": [sys.executable, "-c", "import time; time.sleep(30)"], "timeout": 0.5}, ""),
    ],
    ids=["fails-to-start", "times-out"],
)
def test_a_real_scanner_that_fails_to_start_or_times_out_is_retried(
    store: Store, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], says: str
) -> None:
    from scanqueue import ScanRunner
    from scanqueue.runners.store import RunnerStore

    monkeypatch.setenv("DATABASE_URL", store.database_url)
    RunnerStore(store).add_provider("scanner", "sarif-command", config)
    insert_raw(store, "real", providers='["scanner"]')
    mark_dispatched(store, "real")
    settings = timeouts(max_retries=1, retry_backoff_s=0)
    outcome = execute_scan("real", store=store, runner=ScanRunner(), settings=settings)
    assert outcome is Outcome.RETRYING
    row = store.get("real")
    assert row.status == "queued" and "scanner" in (row.error or "") and says in (row.error or "")
    assert column(store, "real", "retries") == 1


def test_a_real_scanner_past_the_scan_timeout_is_killed_and_the_scan_fails(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from scanqueue import ScanRunner
    from scanqueue.runners.store import RunnerStore

    pidfile = tmp_path / "scanner.pid"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setenv("DATABASE_URL", store.database_url)
    RunnerStore(store).add_provider(
        "sleepy", "sarif-command", {"command": [sys.executable, "-c", script]}
    )
    insert_raw(store, "sleepy", providers='["sleepy"]', timeout_seconds=2)
    mark_dispatched(store, "sleepy")
    t0 = time.monotonic()
    assert execute_scan("sleepy", store=store, runner=ScanRunner(), settings=timeouts()) is (
        Outcome.FAILED
    )
    assert time.monotonic() - t0 < 2 + 3
    row = store.get("sleepy")
    assert row.status == "failed" and row.error == "timed out after 2 s"
    pids = [int(p) for p in pidfile.read_text().split()]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)  # the scanner and the process it started


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
