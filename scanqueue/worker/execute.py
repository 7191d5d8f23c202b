"""One scan's run, start to finish, with no Celery in sight.

``execute_scan(scan_id)`` is what the Celery task calls.  Its state machine
(every arrow a compare-and-set in :mod:`scanqueue.db.store`, keyed on the scan,
the attempt and this process's worker id):

    message ──start_run── lost CAS ──▶ SKIPPED (duplicate or stale message; ack, do nothing)
               │ won
               ▼
            running ── runner returns ──▶ finish_run(completed, findings_count)
               │   ── runner raises  ──▶ finish_run(failed, error=exception text)
               │   ── bad row        ──▶ finish_run(failed, error=what is malformed)
               │   ── told to stop   ──▶ hand_back_run (running → queued) or, when the
               │                         scan was canceled, nothing: a run told to stop
               │                         never completes (CONTRACT §7)
               └─ lease keeper: heartbeat every few seconds;
                  row canceled / re-queued ─▶ ctx told to stop at once;
                  no renewal for the fence time (whatever the heartbeats do: fail,
                  hang, raise) ─▶ ctx told to stop; after the grace period the pool
                  process is terminated.  Fence + grace + margin < lease
                  (:func:`self_fence_after_s`), so a run in doubt is over before the
                  reaper may give the scan to another worker.

The leases are kept by one watchdog thread per process (:class:`LeaseThread`,
started on first use and again in each forked pool process); a run registers
with it for its duration (:class:`LeaseKeeper`), which costs a lock, not a
thread.  The watchdog never touches the database: it hands each heartbeat to a
caller thread and judges the lease by the clock alone, so a heartbeat stuck on
a half-open socket cannot delay the fence.

A :class:`~scanqueue.observe.observer.ScanObserver` hears each step (events, metrics,
lineage, logs); the database write always comes first.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scanqueue.config import fence_margin_s, self_fence_after_s
from scanqueue.db.schema import STATUS_CANCELED, STATUS_COMPLETED, STATUS_FAILED
from scanqueue.db.store import StartedRun, Store, retry_with_backoff
from scanqueue.errors import MalformedRowError, UnavailableError
from scanqueue.identity import worker_identity
from scanqueue.observe.observer import NULL_OBSERVER, RunInfo, ScanObserver
from scanqueue.runners.api import Job, Runner, ScanContext, ScanResult

log = logging.getLogger(__name__)

# Heartbeat calls in flight at once per process, at most (one per run; more only
# while calls hang, until the connection's client-side deadline frees them).
MAX_HEARTBEAT_CALLERS = 64
STOP_REASON_CANCELED = "canceled"


class Outcome(enum.Enum):
    SKIPPED = "skipped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REQUEUED = "requeued"  # told to stop while the lease was in doubt: handed back
    LOST = "lost"  # the lease went elsewhere: this run's outcome is void


@dataclass(frozen=True)
class ExecutionSettings:
    heartbeat_every_s: float
    lease_s: float
    cancel_grace_s: float
    # None: derived from the lease and the grace (self_fence_after_s).
    fence_after_s: float | None = None

    @property
    def fence_s(self) -> float:
        if self.fence_after_s is not None:
            return self.fence_after_s
        return self_fence_after_s(self.lease_s, self.cancel_grace_s)


# Set in Celery prefork children, where ending the process is how a stuck run is
# terminated (the pool replaces the process).  Elsewhere it would end the worker.
terminate_process_when_overdue = False


def execute_scan(
    scan_id: str,
    *,
    store: Store,
    runner: Runner,
    settings: ExecutionSettings,
    observer: ScanObserver = NULL_OBSERVER,
) -> Outcome:
    """Run one scan if (and only if) this call wins ``queued → running``."""
    worker_id = worker_identity()
    started = store.start_run(scan_id, worker_id)
    if started is None:
        log.info("scan %s is not queued any more; duplicate message ignored", scan_id)
        return Outcome.SKIPPED
    info = RunInfo.from_started(started)
    clock = time.monotonic()
    log.info("scan %s attempt %d started", scan_id, started.attempt)
    observer.started(info)
    run = _Run(store, observer, info, clock, settings, worker_id)

    try:
        job = _job_from(started)
    except MalformedRowError as exc:
        return run.finish(STATUS_FAILED, error=str(exc))

    ctx = ScanContext(scan_id, started.attempt, emit=lambda t, p: observer.event(info, t, p))
    keeper = LeaseKeeper(store, ctx, settings, on_overdue=run.overdue, worker_id=worker_id)
    result: ScanResult | None = None
    error: str | None = None
    keeper.start()
    try:
        try:
            result = runner.run(job, ctx)
        except Exception as exc:
            error = _error_text(exc)
    finally:
        # Every way out, including BaseException (a shutdown), leaves the lease thread.
        keeper.stop()
    if ctx.cancelled:
        # Whatever the runner returned or raised: a run told to stop never completes.
        return run.after_stop(ctx)
    if error is not None:
        return run.finish(STATUS_FAILED, error=error)
    return run.finish(STATUS_COMPLETED, findings=_findings_count(result, ctx))


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


class _Run:
    """One started run's ending: its database write, then what the observers hear."""

    def __init__(
        self,
        store: Store,
        observer: ScanObserver,
        info: RunInfo,
        clock: float,
        settings: ExecutionSettings,
        worker_id: str,
    ) -> None:
        self.store = store
        self.observer = observer
        self.info = info
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id
        self._ended = threading.Lock()
        self._reported = False

    def _report_end_once(self) -> bool:
        # The overdue hook (lease thread) and the run's own thread may both end it.
        with self._ended:
            first = not self._reported
            self._reported = True
            return first

    def finish(
        self, status: str, *, error: str | None = None, findings: int | None = None
    ) -> Outcome:
        info = self.info
        duration = time.monotonic() - self.clock
        # A database blip must not strand the row as 'running' until the reaper: retry
        # while this run's lease would still hold (the write is a CAS, so a retry after
        # a lost reply just finds the row already written).
        row = retry_with_backoff(
            lambda: self.store.finish_run(
                info.scan_id,
                info.attempt,
                status,
                error=error,
                findings_count=findings,
                worker_id=self.worker_id,
            ),
            timeout_s=self.settings.fence_s,
            what=f"the database to record scan {info.scan_id}",
        )
        if row is None:
            current = self.store.status_of(info.scan_id)
            canceled = bool(current and current[0] == STATUS_CANCELED)
            log.warning(
                "scan %s attempt %d finished as %s but no longer owns the scan (now %s); "
                "outcome discarded",
                info.scan_id,
                info.attempt,
                status,
                current[0] if current else "deleted",
            )
            self._discard(duration, canceled=canceled)
            return Outcome.CANCELED if canceled else Outcome.LOST
        log.info(
            "scan %s attempt %d %s in %.3fs%s",
            info.scan_id,
            info.attempt,
            status,
            duration,
            f": {error}" if error else f" ({row.findings_count} findings)",
        )
        if self._report_end_once():
            self.observer.finished(info, row, duration)
        return Outcome.COMPLETED if status == STATUS_COMPLETED else Outcome.FAILED

    def after_stop(self, ctx: ScanContext) -> Outcome:
        """The run was told to stop: hand the scan back unless it was canceled or moved on.

        Never ``completed``: the runner's result is discarded, and the scan goes
        back to ``queued`` (a compare-and-set on this run's lease, so it cannot
        touch a newer run or a cancel).  The attempt stays spent: a run in doubt
        counts toward SCANQUEUE_MAX_ATTEMPTS like a lost worker.
        """
        info = self.info
        duration = time.monotonic() - self.clock
        handed = False
        try:
            handed = retry_with_backoff(
                lambda: self.store.hand_back_run(info.scan_id, info.attempt, self.worker_id),
                timeout_s=self.settings.fence_s,
                what=f"the database to hand scan {info.scan_id} back",
            )
        except UnavailableError as exc:
            # The reaper re-queues it once the lease has run out.
            log.warning("could not hand scan %s back: %s", info.scan_id, exc)
        if handed:
            log.warning(
                "scan %s attempt %d stopped (%s) after %.3fs; its outcome is discarded and "
                "the scan re-queued",
                info.scan_id,
                info.attempt,
                ctx.stop_reason,
                duration,
            )
            # As the reaper's hand-back says it: the console's timeline shows why the
            # scan runs again.
            self.observer.event(info, "scan.requeued", {"reason": ctx.stop_reason})
            self._discard(duration, canceled=False)
            return Outcome.REQUEUED
        canceled = ctx.stop_reason == STOP_REASON_CANCELED
        if not canceled:
            try:
                current = self.store.status_of(info.scan_id)
                canceled = bool(current and current[0] == STATUS_CANCELED)
            except UnavailableError:
                pass
        log.info(
            "scan %s attempt %d stopped (%s) after %.3fs",
            info.scan_id,
            info.attempt,
            ctx.stop_reason,
            duration,
        )
        self._discard(duration, canceled=canceled)
        return Outcome.CANCELED if canceled else Outcome.LOST

    def overdue(self, ctx: ScanContext) -> None:
        """The lease thread's hook for a run that ignored its stop past the grace."""
        if terminate_process_when_overdue:
            # This process is about to end: the run's terminal events (lineage ABORT,
            # metrics) now or never, within the fence's margin.
            self._discard(
                time.monotonic() - self.clock, canceled=ctx.stop_reason == STOP_REASON_CANCELED
            )
            lineage = sys.modules.get("scanqueue.observe.lineage")  # loaded only when configured
            if lineage is not None:
                lineage.flush_all(fence_margin_s(self.settings.lease_s) / 2)
        terminate_overdue_run(ctx)

    def _discard(self, duration: float, *, canceled: bool) -> None:
        if not self._report_end_once():
            return
        hook = getattr(self.observer, "canceled", None) if canceled else None
        if callable(hook):
            hook(self.info, duration)
        else:
            self.observer.discarded(self.info, duration)


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
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.settings = settings
        self.on_overdue = on_overdue or terminate_overdue_run
        self.worker_id = worker_id
        self._run: _LeasedRun | None = None
        self._keeper: LeaseThread | None = None

    def start(self) -> None:
        if self._run is not None:
            raise RuntimeError(f"the lease of scan {self.ctx.scan_id} is kept already")
        self._run = _LeasedRun(self.store, self.ctx, self.settings, self.on_overdue, self.worker_id)
        self._keeper = lease_thread()
        self._keeper.register(self._run)

    def stop(self) -> None:
        if self._run is not None and self._keeper is not None:
            self._keeper.unregister(self._run)


class _LeasedRun:
    """A registered run's lease state; changed only under the lease thread's lock."""

    __slots__ = (
        "ctx",
        "fence_s",
        "in_flight",
        "kill_at",
        "last_renewed",
        "next_beat_at",
        "on_overdue",
        "settings",
        "store",
        "worker_id",
    )

    def __init__(
        self,
        store: Store,
        ctx: ScanContext,
        settings: ExecutionSettings,
        on_overdue: Callable[[ScanContext], None],
        worker_id: str | None,
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.settings = settings
        self.on_overdue = on_overdue
        self.worker_id = worker_id
        self.fence_s = settings.fence_s
        # start_run wrote heartbeat_at just before this: a safe lower bound.
        self.last_renewed = time.monotonic()
        self.next_beat_at = self.last_renewed + settings.heartbeat_every_s
        self.in_flight = False
        # Set once told to stop: when the grace period ends.
        self.kill_at: float | None = None

    def wake_at(self) -> float:
        if self.kill_at is not None:
            return self.kill_at
        fence_at = self.last_renewed + self.fence_s
        return fence_at if self.in_flight else min(fence_at, self.next_beat_at)

    def beat(self) -> tuple[bool, str | None]:
        """One heartbeat, in a caller thread: (renewed, reason to stop or None).

        Any error, whatever its class, renews nothing: it counts toward the fence.
        """
        try:
            if self.store.heartbeat(self.ctx.scan_id, self.ctx.attempt, worker_id=self.worker_id):
                return True, None
            current = self.store.status_of(self.ctx.scan_id)
        except Exception as exc:
            log.warning(
                "heartbeat of scan %s failed (%s): %s",
                self.ctx.scan_id,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
            return False, None
        if current and current[0] == STATUS_CANCELED:
            return False, STOP_REASON_CANCELED
        return False, f"lease lost (scan is now {current[0] if current else 'gone'})"


class _Callers:
    """Threads that make the heartbeat calls, so that the watchdog never waits on one.

    A thread is added only when every existing one is busy (a call hangs); the
    connections' client-side deadline frees a hung thread in bounded time.
    """

    def __init__(self, done: Callable[[_LeasedRun, float, bool, str | None], None]) -> None:
        self._done = done
        self._jobs: queue.SimpleQueue[_LeasedRun | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0

    def submit(self, run: _LeasedRun) -> None:
        with self._lock:
            if self._idle == 0 and len(self._threads) < MAX_HEARTBEAT_CALLERS:
                thread = threading.Thread(
                    target=self._loop, name=f"scanqueue-heartbeat-{os.getpid()}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1
        self._jobs.put(run)

    def _loop(self) -> None:
        while True:
            run = self._jobs.get()
            if run is None:
                return
            sent_at = time.monotonic()
            try:
                renewed, reason = run.beat()
            except BaseException:  # never lose the caller: the watchdog still fences
                renewed, reason = False, None
                log.exception("heartbeat of scan %s failed", run.ctx.scan_id)
            try:
                self._done(run, sent_at, renewed, reason)
            except Exception:
                log.exception("lease bookkeeping failed for scan %s", run.ctx.scan_id)
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._jobs.put(None)


class LeaseThread:
    """The process's one watchdog thread that keeps the lease of every registered run.

    It decides from the clock alone: a heartbeat is handed to a caller thread when
    due (one in flight per run), and a run not renewed for its fence time is told
    to stop whether or not its heartbeat has returned; after the grace period it
    is terminated.  The watchdog itself never blocks on the database.
    """

    IDLE_WAIT_S = 60.0  # a bound on every wait, so a missed wake-up costs at most this

    def __init__(self) -> None:
        self.pid = os.getpid()
        # Reentrant: on_overdue runs with the lock held (see _tick) and may itself
        # unregister a run.
        self._cond = threading.Condition(threading.RLock())
        self._runs: set[_LeasedRun] = set()
        # When the waiting thread will look next; -inf while it is busy (it rereads
        # the runs before it waits again).  A registration due later need not wake it.
        self._wake_at = -math.inf
        self._closed = False
        self._thread: threading.Thread | None = None
        self._callers = _Callers(self._beat_done)

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
            elif run.wake_at() < self._wake_at:
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
        self._callers.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                try:
                    self._tick(time.monotonic())
                except Exception:
                    log.exception("lease thread failed")
                now = time.monotonic()
                wake = min((run.wake_at() for run in self._runs), default=math.inf)
                if wake > now:
                    self._wake_at = min(wake, now + self.IDLE_WAIT_S)
                    self._cond.wait(self._wake_at - now)
                    self._wake_at = -math.inf

    def _tick(self, now: float) -> None:
        # Called with the lock held; nothing here waits on the database.
        for run in sorted(self._runs, key=_LeasedRun.wake_at):
            if run.kill_at is not None:
                if now >= run.kill_at:
                    # Under the lock, so that once unregister() has returned the run
                    # cannot be terminated any more.
                    self._runs.discard(run)
                    run.on_overdue(run.ctx)
                continue
            silent = now - run.last_renewed
            if silent >= run.fence_s:
                self._tell(run, f"lease in doubt (not renewed for {silent:.1f}s)", now)
            elif not run.in_flight and now >= run.next_beat_at:
                run.in_flight = True
                self._callers.submit(run)

    def _beat_done(
        self, run: _LeasedRun, sent_at: float, renewed: bool, reason: str | None
    ) -> None:
        with self._cond:
            run.in_flight = False
            run.next_beat_at = time.monotonic() + run.settings.heartbeat_every_s
            if run not in self._runs or run.kill_at is not None:
                return  # ended, or already told to stop, while the heartbeat was on its way
            if renewed:
                # The row's heartbeat_at is the statement's time, never before sent_at.
                run.last_renewed = max(run.last_renewed, sent_at)
            elif reason is not None:
                self._tell(run, reason, time.monotonic())
            if run.wake_at() < self._wake_at:
                self._cond.notify()

    def _tell(self, run: _LeasedRun, reason: str, now: float) -> None:
        run.ctx.request_stop(reason)
        run.kill_at = now + run.settings.cancel_grace_s
        log.info("scan %s attempt %d told to stop: %s", run.ctx.scan_id, run.ctx.attempt, reason)
        self._cond.notify()


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
