"""One scan's run, start to finish, with no Celery in sight.

``execute_scan(scan_id)`` is what the Celery task calls.  Its state machine
(every arrow a compare-and-set in :mod:`scanqueue.store`):

    message ──start_run── lost CAS ──▶ SKIPPED (duplicate or stale message; ack, do nothing)
               │ won
               ▼
            running ── runner returns ──▶ finish_run(completed, findings_count)
               │   ── runner raises  ──▶ finish_run(failed, error=exception text)
               │   ── bad row        ──▶ finish_run(failed, error=what is malformed)
               └─ lease keeper: heartbeat every few seconds;
                  row canceled / re-queued / DB gone past the lease ─▶ ctx told to stop,
                  after the grace period the pool process is terminated.
                  A finish after that loses its CAS and writes nothing.

The leases are kept by one daemon thread per process (:class:`LeaseThread`,
started on first use and again in each forked pool process); a run registers
with it for its duration (:class:`LeaseKeeper`), which costs a lock, not a thread.

A :class:`~scanqueue.observe.ScanObserver` hears each step (events, metrics,
lineage, logs); the database write always comes first.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MalformedRowError, ScanqueueError
from .observe import NULL_OBSERVER, RunInfo, ScanObserver
from .runner import Job, Runner, ScanContext, ScanResult
from .schema import STATUS_CANCELED, STATUS_COMPLETED, STATUS_FAILED
from .store import StartedRun, Store, retry_with_backoff

log = logging.getLogger(__name__)

# Self-fencing: a run that could not renew its lease for this share of the lease
# stops before the reaper may hand the scan to someone else.
SELF_FENCE_SHARE = 0.8


class Outcome(enum.Enum):
    SKIPPED = "skipped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"  # the lease went elsewhere: this run's outcome is void


@dataclass(frozen=True)
class ExecutionSettings:
    heartbeat_every_s: float
    lease_s: float
    cancel_grace_s: float


_identity: tuple[int, str] | None = None
# Set in Celery prefork children, where ending the process is how a stuck run is
# terminated (the pool replaces the process).  Elsewhere it would end the worker.
terminate_process_when_overdue = False


def worker_identity() -> str:
    """This process's incarnation id: host, pid and a random part (hosts and pids repeat).

    A forked pool process extends its parent's id (``parent/pid:random``), so a
    worker can find the runs of its own pool when it shuts down.
    """
    global _identity
    pid = os.getpid()
    if _identity is None:
        _identity = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
    elif _identity[0] != pid:
        parent = _identity[1].split("/", 1)[0]
        _identity = (pid, f"{parent}/{pid}:{uuid.uuid4().hex[:4]}")
    return _identity[1]


def execute_scan(
    scan_id: str,
    *,
    store: Store,
    runner: Runner,
    settings: ExecutionSettings,
    observer: ScanObserver = NULL_OBSERVER,
) -> Outcome:
    """Run one scan if (and only if) this call wins ``queued → running``."""
    started = store.start_run(scan_id, worker_identity())
    if started is None:
        log.info("scan %s is not queued any more; duplicate message ignored", scan_id)
        return Outcome.SKIPPED
    info = RunInfo.from_started(started)
    clock = time.monotonic()
    log.info("scan %s attempt %d started", scan_id, started.attempt)
    observer.started(info)

    try:
        job = _job_from(started)
    except MalformedRowError as exc:
        return _finish(
            store, observer, info, STATUS_FAILED, clock, error=str(exc), settings=settings
        )

    ctx = ScanContext(scan_id, started.attempt, emit=lambda t, p: observer.event(info, t, p))
    keeper = LeaseKeeper(store, ctx, settings)
    keeper.start()
    try:
        result = runner.run(job, ctx)
    except Exception as exc:
        keeper.stop()
        if ctx.cancelled:
            return _after_stop(store, observer, info, ctx, clock, settings=settings)
        return _finish(
            store, observer, info, STATUS_FAILED, clock, error=_error_text(exc), settings=settings
        )
    keeper.stop()
    findings = _findings_count(result, ctx)
    if ctx.cancelled:
        # A run that was told to stop may still own the scan (e.g. the database was
        # only briefly unreachable); the CAS decides.
        return _after_stop(store, observer, info, ctx, clock, findings=findings, settings=settings)
    return _finish(
        store, observer, info, STATUS_COMPLETED, clock, findings=findings, settings=settings
    )


def _job_from(started: StartedRun) -> Job:
    return Job.from_stored(
        started.scan_id,
        started.providers_raw,
        started.frameworks_raw,
        triggered_by_user=started.triggered_by_user,
        triggered_by_token=started.triggered_by_token,
        attempt=started.attempt,
    )


def _findings_count(result: ScanResult | None, ctx: ScanContext) -> int:
    if result is None:
        return ctx.findings_reported
    count = getattr(result, "findings_count", 0)
    return int(count) if isinstance(count, int) and count >= 0 else 0


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _finish(
    store: Store,
    observer: ScanObserver,
    info: RunInfo,
    status: str,
    clock: float,
    *,
    error: str | None = None,
    findings: int | None = None,
    settings: ExecutionSettings | None = None,
) -> Outcome:
    duration = time.monotonic() - clock
    # A database blip must not strand the row as 'running' until the reaper: retry
    # while this run's lease would still hold (the write is a CAS, so a retry after
    # a lost reply just finds the row already written).
    retry_s = settings.lease_s * SELF_FENCE_SHARE if settings else 0.0
    row = retry_with_backoff(
        lambda: store.finish_run(
            info.scan_id, info.attempt, status, error=error, findings_count=findings
        ),
        timeout_s=retry_s,
        what=f"the database to record scan {info.scan_id}",
    )
    if row is None:
        current = store.status_of(info.scan_id)
        log.warning(
            "scan %s attempt %d finished as %s but no longer owns the scan (now %s); "
            "outcome discarded",
            info.scan_id,
            info.attempt,
            status,
            current[0] if current else "deleted",
        )
        observer.discarded(info, duration)
        return Outcome.CANCELED if current and current[0] == STATUS_CANCELED else Outcome.LOST
    log.info(
        "scan %s attempt %d %s in %.3fs%s",
        info.scan_id,
        info.attempt,
        status,
        duration,
        f": {error}" if error else f" ({row.findings_count} findings)",
    )
    observer.finished(info, row, duration)
    return Outcome.COMPLETED if status == STATUS_COMPLETED else Outcome.FAILED


def _after_stop(
    store: Store,
    observer: ScanObserver,
    info: RunInfo,
    ctx: ScanContext,
    clock: float,
    findings: int | None = None,
    settings: ExecutionSettings | None = None,
) -> Outcome:
    current = store.status_of(info.scan_id)
    if current == ("running", info.attempt):
        # Still ours (the stop came from a database outage, not a cancel): the
        # runner's result stands.
        return _finish(
            store, observer, info, STATUS_COMPLETED, clock, findings=findings, settings=settings
        )
    duration = time.monotonic() - clock
    log.info(
        "scan %s attempt %d stopped (%s) after %.3fs",
        info.scan_id,
        info.attempt,
        ctx.stop_reason,
        duration,
    )
    observer.discarded(info, duration)
    return Outcome.CANCELED if current and current[0] == STATUS_CANCELED else Outcome.LOST


class LeaseKeeper:
    """One run's registration with the process's :class:`LeaseThread`.

    ``start()`` registers the run and ``stop()`` unregisters it; neither starts nor
    joins a thread.  After ``stop()`` returns the run is told nothing any more (no
    ``request_stop``, no ``on_overdue``); at most a heartbeat already on its way
    completes.
    """

    def __init__(
        self,
        store: Store,
        ctx: ScanContext,
        settings: ExecutionSettings,
        on_overdue: Callable[[ScanContext], None] | None = None,
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.settings = settings
        self.on_overdue = on_overdue or terminate_overdue_run
        self._run: _LeasedRun | None = None
        self._keeper: LeaseThread | None = None

    def start(self) -> None:
        if self._run is not None:
            raise RuntimeError(f"the lease of scan {self.ctx.scan_id} is kept already")
        self._run = _LeasedRun(self.store, self.ctx, self.settings, self.on_overdue)
        self._keeper = lease_thread()
        self._keeper.register(self._run)

    def stop(self) -> None:
        if self._run is not None and self._keeper is not None:
            self._keeper.unregister(self._run)


class _LeasedRun:
    """A registered run's lease state; once registered, only the lease thread changes it."""

    __slots__ = (
        "ctx",
        "fence_after",
        "last_renewed",
        "next_at",
        "on_overdue",
        "overdue",
        "settings",
        "store",
    )

    def __init__(
        self,
        store: Store,
        ctx: ScanContext,
        settings: ExecutionSettings,
        on_overdue: Callable[[ScanContext], None],
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.settings = settings
        self.on_overdue = on_overdue
        self.fence_after = settings.lease_s * SELF_FENCE_SHARE
        self.last_renewed = time.monotonic()
        # When the thread next acts: the next heartbeat or, once told to stop
        # (``overdue``), the end of the grace period.
        self.next_at = self.last_renewed + settings.heartbeat_every_s
        self.overdue = False

    def renew(self) -> str | None:
        """One heartbeat; the reason to stop, or None while the lease holds."""
        try:
            if self.store.heartbeat(self.ctx.scan_id, self.ctx.attempt):
                self.last_renewed = time.monotonic()
                return None
            current = self.store.status_of(self.ctx.scan_id)
            if current and current[0] == STATUS_CANCELED:
                return "canceled"
            return f"lease lost (scan is now {current[0] if current else 'gone'})"
        except ScanqueueError as exc:
            if time.monotonic() - self.last_renewed < self.fence_after:
                log.warning("heartbeat of scan %s failed: %s", self.ctx.scan_id, exc)
                return None
            return "lease lost (database unreachable)"
        except Exception:
            log.exception("heartbeat of scan %s failed", self.ctx.scan_id)
            return None
        finally:
            self.next_at = time.monotonic() + self.settings.heartbeat_every_s


class LeaseThread:
    """The process's one daemon thread that keeps the lease of every registered run.

    Due runs are served one after another, the longest-due first, so a slow
    heartbeat delays the others by its duration but never skips them.
    """

    IDLE_WAIT_S = 60.0  # a bound on every wait, so a missed wake-up costs at most this

    def __init__(self) -> None:
        self.pid = os.getpid()
        # Reentrant: on_overdue runs with the lock held (see _serve) and may itself
        # unregister a run.
        self._cond = threading.Condition(threading.RLock())
        self._runs: set[_LeasedRun] = set()
        # When the waiting thread will look next; -inf while it is busy (it rereads
        # the runs before it waits again).  A registration due later need not wake it.
        self._wake_at = -math.inf
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def closed(self) -> bool:
        return self._closed

    def register(self, run: _LeasedRun) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the lease thread is closed")
            self._runs.add(run)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"scanqueue-lease-{self.pid}", daemon=True
                )
                self._thread.start()
            elif run.next_at < self._wake_at:
                self._cond.notify()

    def unregister(self, run: _LeasedRun) -> None:
        # No wake-up: the thread finds nothing due at its next look.
        with self._cond:
            self._runs.discard(run)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (registered runs are dropped); for shutdown and tests."""
        with self._cond:
            self._closed = True
            self._runs.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                run = min(self._runs, key=_next_at, default=None)
                if run is None or run.next_at > now:
                    self._wake_at = min(run.next_at if run else math.inf, now + self.IDLE_WAIT_S)
                    self._cond.wait(self._wake_at - now)
                    self._wake_at = -math.inf
                    continue
            try:
                self._serve(run)
            except Exception:
                log.exception("lease thread failed on scan %s", run.ctx.scan_id)
                with self._cond:
                    self._runs.discard(run)

    def _serve(self, run: _LeasedRun) -> None:
        if run.overdue:
            with self._cond:
                # Under the lock, so that once unregister() has returned the run
                # cannot be terminated any more.
                if run in self._runs:
                    self._runs.discard(run)
                    run.on_overdue(run.ctx)
            return
        # The database calls are made without the lock, so registrations never wait
        # for them.  A heartbeat already on its way when its run ends may still land:
        # it is a CAS on (scan, attempt, running), so after the finish it writes nothing.
        reason = run.renew()
        if reason is None:
            return
        with self._cond:
            if run not in self._runs:
                return  # the run ended while its heartbeat was on the way
            run.ctx.request_stop(reason)
            run.overdue = True
            run.next_at = time.monotonic() + run.settings.cancel_grace_s
        log.info("scan %s attempt %d told to stop: %s", run.ctx.scan_id, run.ctx.attempt, reason)


def _next_at(run: _LeasedRun) -> float:
    return run.next_at


_lease_thread: LeaseThread | None = None
_lease_thread_lock = threading.Lock()


def lease_thread() -> LeaseThread:
    """This process's lease thread, created on first use (a forked child gets its own)."""
    global _lease_thread
    keeper = _lease_thread
    if keeper is not None and keeper.pid == os.getpid() and not keeper.closed:
        return keeper
    with _lease_thread_lock:
        if _lease_thread is None or _lease_thread.pid != os.getpid() or _lease_thread.closed:
            _lease_thread = LeaseThread()
        return _lease_thread


def _after_fork_in_child() -> None:
    # The parent's lock may have been held by another thread at fork time, and its
    # lease thread does not exist here.
    global _lease_thread, _lease_thread_lock
    _lease_thread_lock = threading.Lock()
    _lease_thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def terminate_overdue_run(ctx: ScanContext) -> None:
    """End a run that ignored its stop signal past the grace period."""
    if terminate_process_when_overdue:
        log.error(
            "scan %s ignored '%s' past the grace period; ending pool process %d "
            "(the pool replaces it)",
            ctx.scan_id,
            ctx.stop_reason,
            os.getpid(),
        )
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        log.error(
            "scan %s ignored '%s' past the grace period; it cannot be terminated in this "
            "pool, and whatever it returns will be discarded",
            ctx.scan_id,
            ctx.stop_reason,
        )
