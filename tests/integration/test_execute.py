"""execute_scan against a real database: outcomes, bad rows, cancel, lease loss and the
process's one lease thread."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scanqueue import Job, ScanContext, ScanResult
from scanqueue.db.store import Store
from scanqueue.errors import ConfigError
from scanqueue.runners.api import RunnerFunc, StubRunner, load_runner
from scanqueue.worker.execute import ExecutionSettings, Outcome, execute_scan
from scanqueue.worker.lease import LeaseKeeper, lease_thread
from tests.claimed import mark_dispatched
from tests.integration.test_store import insert_claimed, insert_raw

FAST = ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.5)


def run(store: Store, scan_id: str, fn: Any, settings: ExecutionSettings = FAST) -> Outcome:
    """A message for ``scan_id``, claimed first as a bridge would (a queued row only)."""
    mark_dispatched(store, scan_id)
    return execute_scan(scan_id, store=store, runner=RunnerFunc(fn), settings=settings)


def test_completed_with_findings_count(store: Store) -> None:
    insert_raw(store, "ok")
    assert run(store, "ok", lambda job, ctx: ScanResult(findings_count=4)) is Outcome.COMPLETED
    row = store.get("ok")
    assert (row.status, row.findings_count, row.attempts) == ("completed", 4, 1)
    assert row.finished_at is not None and row.error is None


def test_runner_exception_fails_the_scan_with_its_text(store: Store) -> None:
    insert_raw(store, "boom")

    def explode(job: Job, ctx: ScanContext) -> None:
        raise ValueError("provider aws: credentials expired")

    assert run(store, "boom", explode) is Outcome.FAILED
    row = store.get("boom")
    assert row.status == "failed" and row.error == "provider aws: credentials expired"


def test_duplicate_message_does_nothing(store: Store) -> None:
    insert_raw(store, "dup")
    calls: list[str] = []
    fn = lambda job, ctx: calls.append(job.scan_id)  # noqa: E731
    assert run(store, "dup", fn) is Outcome.COMPLETED
    assert run(store, "dup", fn) is Outcome.SKIPPED
    assert calls == ["dup"] and store.get("dup").attempts == 1


def test_a_message_that_is_not_claimed_starts_nothing(store: Store) -> None:
    insert_raw(store, "unclaimed")
    calls: list[str] = []
    outcome = execute_scan(
        "unclaimed", store=store, runner=RunnerFunc(lambda j, c: calls.append(j.scan_id)),
        settings=FAST,
    )  # fmt: skip
    assert outcome is Outcome.SKIPPED and calls == []
    assert store.get("unclaimed").status == "queued"


def test_a_message_runs_the_dispatched_higher_priority_scan_in_its_place(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything after the start is the started scan's: job, context, lease, outcome."""
    insert_claimed(store, "routine")
    insert_claimed(store, "urgent", priority=10)
    seen: list[tuple[str, str]] = []

    def fn(job: Job, ctx: ScanContext) -> ScanResult:
        seen.append((job.scan_id, ctx.scan_id))
        ctx.wait(0.3)  # a few heartbeats: they renew the started scan's lease
        return ScanResult(findings_count=2)

    with caplog.at_level(logging.INFO, logger="scanqueue.worker.execute"):
        outcome = execute_scan("routine", store=store, runner=RunnerFunc(fn), settings=FAST)
    assert outcome is Outcome.COMPLETED and seen == [("urgent", "urgent")]
    urgent, routine = store.get("urgent"), store.get("routine")
    assert (urgent.status, urgent.findings_count, urgent.attempts) == ("completed", 2, 1)
    assert (routine.status, routine.attempts) == ("queued", 0)
    assert store.in_flight() == 0  # the routine scan waits for a claim of its own
    assert "scan urgent attempt 1 started by the message of scan routine" in caplog.text


@pytest.mark.parametrize(
    ("providers", "frameworks", "reason"),
    [
        ("not json", "[]", "providers_scanned: expected a JSON array of strings, got a string"),
        ('{"a": 1}', "[]", "providers_scanned: expected a JSON array of strings, got an object"),
        ('["aws"]', "[1, 2]", "frameworks_scanned: expected a JSON array of strings, got a num"),
    ],
)
def test_malformed_row_fails_with_a_reason(
    store: Store, providers: str, frameworks: str, reason: str
) -> None:
    if store.dialect == "postgresql" and providers == "not json":
        pytest.skip("jsonb rejects malformed JSON at INSERT")
    insert_raw(store, "bad", providers=providers, frameworks=frameworks)
    assert run(store, "bad", lambda job, ctx: None) is Outcome.FAILED
    row = store.get("bad")
    assert row.status == "failed" and reason in (row.error or "")
    insert_raw(store, "good")
    assert run(store, "good", lambda job, ctx: None) is Outcome.COMPLETED


def test_the_runner_sees_the_token_but_the_row_json_never_does(store: Store) -> None:
    insert_raw(store, "tok", triggered_by_user="bob", triggered_by_token="tkn-123")
    seen: dict[str, Any] = {}

    def grab(job: Job, ctx: ScanContext) -> None:
        seen.update(token=job.triggered_by_token, user=job.triggered_by_user, repr=repr(job))

    run(store, "tok", grab)
    assert seen["token"] == "tkn-123" and seen["user"] == "bob"
    assert "tkn-123" not in seen["repr"] and "tkn-123" not in str(store.get("tok").to_json())


def test_cancel_tells_a_cooperative_runner_to_stop(store: Store) -> None:
    insert_raw(store, "c")
    entered, stopped = threading.Event(), threading.Event()

    def patient(job: Job, ctx: ScanContext) -> ScanResult:
        entered.set()
        if ctx.wait(30):
            stopped.set()
        return ScanResult(findings_count=9)

    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.append(run(store, "c", patient)))
    t.start()
    assert entered.wait(10)  # the run owns the scan before it is canceled
    store.cancel("c")
    t.join(10)
    assert stopped.is_set() and result == [Outcome.CANCELED]
    row = store.get("c")
    assert row.status == "canceled" and row.findings_count == 0


def test_lease_loss_stops_the_run_and_voids_its_outcome(store: Store) -> None:
    insert_raw(store, "lost")
    entered = threading.Event()

    def patient(job: Job, ctx: ScanContext) -> ScanResult:
        entered.set()
        ctx.wait(30)
        return ScanResult(findings_count=1)

    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.append(run(store, "lost", patient)))
    t.start()
    assert entered.wait(10)  # running, with a lease to lose
    t0 = time.monotonic()
    store.reap_orphans(lease_s=0, max_attempts=3)  # as if the heartbeat went stale
    t.join(10)
    assert result == [Outcome.LOST] and time.monotonic() - t0 < 5
    assert store.get("lost").status == "queued"


def test_overdue_run_is_terminated_after_the_grace_period(store: Store) -> None:
    insert_claimed(store, "stuck")
    started = store.start_run("stuck", "w")
    assert started is not None
    ctx = ScanContext("stuck", started.attempt)
    overdue: list[float] = []
    keeper = LeaseKeeper(store, ctx, FAST, on_overdue=lambda c: overdue.append(time.monotonic()))
    t0 = time.monotonic()
    keeper.start()
    store.cancel("stuck")
    deadline = time.monotonic() + 5
    while not overdue and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.stop()
    assert ctx.cancelled and ctx.stop_reason == "canceled"
    assert overdue and FAST.cancel_grace_s <= overdue[0] - t0 < FAST.cancel_grace_s + 1.5


class RecordingStore(Store):
    """The same database, with every heartbeat's scan and time written down."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.database_url, engine=store.engine)
        self.beats: list[tuple[str, float]] = []

    def heartbeat(self, scan_id: str, attempt: int, *, worker_id: str | None = None) -> bool:
        self.beats.append((scan_id, time.monotonic()))
        return super().heartbeat(scan_id, attempt, worker_id=worker_id)


class GatedStore(RecordingStore):
    """Holds each heartbeat until the test releases it: a slow database, on demand."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.entered = threading.Event()
        self.release = threading.Event()

    def heartbeat(self, scan_id: str, attempt: int, *, worker_id: str | None = None) -> bool:
        self.entered.set()
        self.release.wait(10)
        return super().heartbeat(scan_id, attempt, worker_id=worker_id)


def started_ctx(store: Store, scan_id: str) -> ScanContext:
    insert_claimed(store, scan_id)
    started = store.start_run(scan_id, "w")
    assert started is not None
    return ScanContext(scan_id, started.attempt)


def test_sequential_runs_share_one_lease_thread(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert_raw(store, "warm")
    assert run(store, "warm", lambda job, ctx: None) is Outcome.COMPLETED
    keeper_thread = lease_thread().thread
    assert keeper_thread is not None and keeper_thread.is_alive()
    before = {t.ident for t in threading.enumerate()}
    starts: list[str] = []
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        starts.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for k in range(50):
        insert_raw(store, f"seq{k}")
        assert run(store, f"seq{k}", lambda job, ctx: time.sleep(0.005)) is Outcome.COMPLETED
    assert starts == []
    assert {t.ident for t in threading.enumerate()} == before
    assert lease_thread().thread is keeper_thread and keeper_thread.is_alive()


def _times_woken(thread: threading.Thread) -> int:
    """How often the kernel woke ``thread`` from a wait (its voluntary switches)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
    return int(line.split(":")[1])


def test_short_runs_come_and_go_without_waking_the_lease_thread(store: Store) -> None:
    insert_raw(store, "idle-warm")
    assert run(store, "idle-warm", lambda job, ctx: None) is Outcome.COMPLETED
    thread = lease_thread().thread
    assert thread is not None
    time.sleep(0.05)  # into its idle wait, which ends one heartbeat interval on
    woken = _times_woken(thread)
    t0 = time.monotonic()
    for k in range(40):
        insert_raw(store, f"short{k}")
        assert run(store, f"short{k}", lambda job, ctx: None) is Outcome.COMPLETED
    looks = (time.monotonic() - t0) / FAST.heartbeat_every_s + 2  # its own, on the clock
    # Waking it at each start cost at least one switch a run (40 here).
    assert _times_woken(thread) - woken <= 2 * looks + 4, (woken, looks)


def test_a_run_registered_while_the_lease_thread_idles_gets_its_heartbeat_on_time(
    store: Store,
) -> None:
    insert_raw(store, "idle-first")
    assert run(store, "idle-first", lambda job, ctx: None) is Outcome.COMPLETED
    rec = RecordingStore(store)
    for delay in (0.0, 0.03, 0.07):  # at points across the thread's idle wait
        time.sleep(delay)
        scan_id = f"idle-beat-{delay}"
        ctx = started_ctx(store, scan_id)
        keeper = LeaseKeeper(rec, ctx, FAST)
        t0 = time.monotonic()
        keeper.start()
        time.sleep(FAST.heartbeat_every_s * 2.5)
        keeper.stop()
        times = [t - t0 for s, t in rec.beats if s == scan_id]
        assert times, scan_id
        # One interval on; never as late as a second one.
        assert FAST.heartbeat_every_s * 0.95 <= times[0] < FAST.heartbeat_every_s * 2, times


def test_two_runs_registered_at_once_both_get_heartbeats(store: Store) -> None:
    rec = RecordingStore(store)
    ctxs = [started_ctx(store, "twin-a"), started_ctx(store, "twin-b")]
    keepers = [LeaseKeeper(rec, ctx, FAST) for ctx in ctxs]
    t0 = time.monotonic()
    for keeper in keepers:
        keeper.start()
    time.sleep(0.65)
    for keeper in keepers:
        keeper.stop()
    stopped = time.monotonic()
    for scan_id in ("twin-a", "twin-b"):
        times = [t for s, t in rec.beats if s == scan_id]
        assert len(times) >= 4, (scan_id, times)
        # The first heartbeat one interval after the start, not sooner.
        assert times[0] - t0 >= FAST.heartbeat_every_s * 0.95
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= FAST.heartbeat_every_s * 0.95
    assert not any(ctx.cancelled for ctx in ctxs)
    time.sleep(0.3)
    assert all(t <= stopped for _, t in rec.beats)  # none after unregistering


def test_a_run_unregistered_mid_heartbeat_is_never_stopped_or_terminated(store: Store) -> None:
    gated = GatedStore(store)
    ctx = started_ctx(store, "gate")
    store.cancel("gate")  # the held heartbeat will find the scan canceled
    overdue: list[ScanContext] = []
    settings = ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.05)
    keeper = LeaseKeeper(gated, ctx, settings, on_overdue=overdue.append)
    keeper.start()
    try:
        assert gated.entered.wait(5)
        t0 = time.monotonic()
        keeper.stop()
        assert time.monotonic() - t0 < 1  # no waiting for the heartbeat on its way (10 s)
    finally:
        gated.release.set()
    time.sleep(0.5)
    assert overdue == [] and not ctx.cancelled
    assert len(gated.beats) == 1


def test_a_run_unregistered_in_its_grace_period_is_not_terminated(store: Store) -> None:
    ctx = started_ctx(store, "graced")
    overdue: list[ScanContext] = []
    settings = ExecutionSettings(heartbeat_every_s=0.1, lease_s=5, cancel_grace_s=0.4)
    keeper = LeaseKeeper(store, ctx, settings, on_overdue=overdue.append)
    keeper.start()
    store.cancel("graced")
    assert ctx.wait(5) and ctx.stop_reason == "canceled"
    keeper.stop()
    time.sleep(settings.cancel_grace_s + 0.3)
    assert overdue == []


def test_a_hung_heartbeat_delays_no_other_run(store: Store) -> None:
    """Heartbeats are made off the watchdog: one stuck call holds up nobody else's."""
    gated = GatedStore(store)
    rec = RecordingStore(store)
    slow = LeaseKeeper(gated, started_ctx(store, "slow"), FAST)
    fast = LeaseKeeper(rec, started_ctx(store, "fast"), FAST)
    slow.start()
    fast.start()
    try:
        assert gated.entered.wait(5)
        time.sleep(0.5)
        assert len(rec.beats) >= 3  # renewed on time while the other call hangs
        assert len(gated.beats) == 0  # one call in flight per run: no pile-up
    finally:
        gated.release.set()
        slow.stop()
        fast.stop()


def test_a_forked_child_gets_its_own_lease_thread(store: Store) -> None:
    parent = lease_thread()
    keeper = LeaseKeeper(store, ScanContext("nobody", 1), FAST)
    keeper.start()  # the parent's thread exists when the fork happens
    try:
        pid = os.fork()
        if pid == 0:
            ok = False
            try:
                child = lease_thread()
                ctx = ScanContext("child", 1)
                slow = ExecutionSettings(heartbeat_every_s=60, lease_s=120, cancel_grace_s=1)
                child_keeper = LeaseKeeper(store, ctx, slow)
                child_keeper.start()
                thread = child.thread
                ok = (
                    child is not parent
                    and child.pid == os.getpid()
                    and thread is not None
                    and thread.is_alive()
                )
                child_keeper.stop()
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        keeper.stop()
    assert lease_thread() is parent


def test_closing_the_lease_thread_ends_it_and_a_new_one_follows(store: Store) -> None:
    keeper = LeaseKeeper(store, ScanContext("nobody", 1), FAST)
    keeper.start()
    keeper.stop()
    old = lease_thread()
    thread = old.thread
    assert thread is not None and thread.is_alive()
    old.close()
    assert not thread.is_alive()
    assert lease_thread() is not old
    insert_raw(store, "after-close")
    assert run(store, "after-close", lambda job, ctx: None) is Outcome.COMPLETED


def test_load_runner_accepts_objects_classes_and_functions() -> None:
    assert isinstance(load_runner("scanqueue.runners.api:StubRunner"), StubRunner)
    assert isinstance(load_runner("tests.runners:journal_runner"), RunnerFunc)
    assert load_runner("tests.runners:TokenEchoRunner").run  # class built with no arguments


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("no_such_module_xyz:run", "cannot import module 'no_such_module_xyz'"),
        ("tests.runners:missing", "has no 'missing'"),
        ("tests.runners:not_a_runner", "neither a runner"),
        ("tests.runners", "expected 'module:attribute'"),
    ],
)
def test_load_runner_errors_are_one_line_naming_the_variable(path: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_runner(path)
    assert str(err.value).startswith("SCANQUEUE_RUNNER: ") and says in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.postgres
def test_finish_survives_a_brief_database_outage(pg_server: Any) -> None:
    """The runner ends while PostgreSQL restarts: the outcome is still recorded."""
    from scanqueue.config import normalize_database_url
    from scanqueue.db.store import Store
    from tests.conftest import create_pg_database, upgrade

    url = create_pg_database(pg_server.admin_url)
    upgrade(url)
    store = Store(normalize_database_url(url))
    insert_raw(store, "blip")
    entered, release = threading.Event(), threading.Event()

    def waits(job: Job, ctx: ScanContext) -> ScanResult:
        entered.set()
        release.wait(30)
        return ScanResult(findings_count=2)

    settings = ExecutionSettings(heartbeat_every_s=0.2, lease_s=20, cancel_grace_s=1)
    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.append(run(store, "blip", waits, settings)))
    t.start()
    assert entered.wait(10)
    pg_server.stop("fast")
    release.set()
    time.sleep(1.5)  # the finish is retried meanwhile
    pg_server.start()
    t.join(30)
    assert result == [Outcome.COMPLETED]
    row = store.get("blip")
    assert row.status == "completed" and row.findings_count == 2
