"""Keeping a running scan's lease: heartbeats, the fence, and ending a run in doubt.

A run that won ``queued → running`` (:func:`scanqueue.worker.execute.execute_scan`)
registers here for its duration (:class:`LeaseKeeper`), which costs a lock, not a
thread, and wakes no thread unless the run is due before the watchdog looks again.
One watchdog thread per process (:class:`LeaseThread`, started on first use and
again in each forked pool process) keeps every registered run's lease:

    registered ── every heartbeat_every_s ──▶ heartbeat (in a caller thread)
       │   renewed            ─▶ fence clock restarts
       │   row canceled       ─▶ ctx told to stop ("canceled")
       │   row re-queued/gone ─▶ ctx told to stop ("lease lost")
       │   no renewal for the fence time (whatever the heartbeats do: fail,
       │   hang, raise)        ─▶ ctx told to stop ("lease in doubt")
       │   the run's timeout passed (SCANQUEUE_SCAN_TIMEOUT or the row's
       │   timeout_seconds)    ─▶ ctx told to stop ("timed out after N s")
       ▼
    told to stop ── still running after cancel_grace_s ──▶ on_overdue: the pool
                    process is terminated (:func:`terminate_overdue_run`)

Fence + grace + margin < lease (:func:`scanqueue.config.self_fence_after_s`), so
a run in doubt is over before the reaper may give the scan to another worker.
The watchdog never touches the database: it hands each heartbeat to a caller
thread and judges the lease by the clock alone, so a heartbeat stuck on a
half-open socket cannot delay the fence.  What the run does once told to stop
(hand the scan back, nothing when it was canceled, or record a timeout as a
failure or a retry — also from ``on_overdue``, before the process ends) is
:mod:`scanqueue.worker.execute`'s business.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

from scanqueue.db.schema import STATUS_CANCELED
from scanqueue.db.store import Store
from scanqueue.runners.api import ScanContext

log = logging.getLogger(__name__)

# Heartbeat calls in flight at once per process, at most (one per run; more only
# while calls hang, until the connection's client-side deadline frees them).
MAX_HEARTBEAT_CALLERS = 64
STOP_REASON_CANCELED = "canceled"
# A timed-out run's stop reason starts so, and so does its scan's error
# (docs/reference.md#policies).
STOP_REASON_TIMED_OUT = "timed out after"


def timed_out_reason(timeout_s: float) -> str:
    return f"{STOP_REASON_TIMED_OUT} {timeout_s:g} s"


def was_timed_out(ctx: ScanContext) -> bool:
    """True when the run was told to stop because it ran past its timeout."""
    reason = ctx.stop_reason
    return reason is not None and reason.startswith(STOP_REASON_TIMED_OUT)


# Set in Celery prefork children, where ending the process is how a stuck run is
# terminated (the pool replaces the process).  Elsewhere it would end the worker.
terminate_process_when_overdue = False


class LeaseSettings(Protocol):
    """The lease's timings (:class:`scanqueue.worker.execute.ExecutionSettings` has them)."""

    @property
    def heartbeat_every_s(self) -> float: ...

    @property
    def cancel_grace_s(self) -> float: ...

    @property
    def fence_s(self) -> float:
        """Not renewed for this long: the run is told to stop."""
        ...


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
        settings: LeaseSettings,
        on_overdue: Callable[[ScanContext], None] | None = None,
        worker_id: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.ctx = ctx
        self.settings = settings
        self.on_overdue = on_overdue or terminate_overdue_run
        self.worker_id = worker_id
        # None or <= 0: no limit.  Counted from start(), just after the run's start.
        self.timeout_s = timeout_s if timeout_s is not None and timeout_s > 0 else None
        self._run: _LeasedRun | None = None
        self._keeper: LeaseThread | None = None

    def start(self) -> None:
        if self._run is not None:
            raise RuntimeError(f"the lease of scan {self.ctx.scan_id} is kept already")
        self._run = _LeasedRun(
            self.store, self.ctx, self.settings, self.on_overdue, self.worker_id, self.timeout_s
        )
        self._keeper = lease_thread()
        self._keeper.register(self._run)

    def stop(self) -> None:
        if self._run is not None and self._keeper is not None:
            self._keeper.unregister(self._run)


class _LeasedRun:
    """A registered run's lease state; changed only under the lease thread's lock."""

    __slots__ = (
        "ctx",
        "deadline",
        "fence_s",
        "in_flight",
        "kill_at",
        "last_renewed",
        "next_beat_at",
        "on_overdue",
        "settings",
        "store",
        "timeout_s",
        "worker_id",
    )

    def __init__(
        self,
        store: Store,
        ctx: ScanContext,
        settings: LeaseSettings,
        on_overdue: Callable[[ScanContext], None],
        worker_id: str | None,
        timeout_s: float | None = None,
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
        self.timeout_s = timeout_s
        self.deadline = math.inf if timeout_s is None else self.last_renewed + timeout_s
        self.in_flight = False
        # Set once told to stop: when the grace period ends.
        self.kill_at: float | None = None

    def wake_at(self) -> float:
        if self.kill_at is not None:
            return self.kill_at
        fence_at = min(self.last_renewed + self.fence_s, self.deadline)
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
    MIN_IDLE_WAIT_S = 0.05

    def __init__(self) -> None:
        self.pid = os.getpid()
        # Reentrant: on_overdue runs with the lock held (see _tick) and may itself
        # unregister a run.
        self._cond = threading.Condition(threading.RLock())
        self._runs: set[_LeasedRun] = set()
        # When the waiting thread will look next; -inf while it is busy (it rereads
        # the runs before it waits again).  A registration due later need not wake it.
        self._wake_at = -math.inf
        # How long the thread waits with no run registered: once a run has been seen,
        # its heartbeat interval.  A run registered while the thread idles is then due
        # no sooner than the thread looks again, so short runs (a no-op scan lasts a
        # millisecond, long before the thread looks) register and go without waking
        # it; waking it on every start cost each run two thread switches and a hand-off
        # of the GIL in the pool process's critical path.
        self._idle_wait_s = self.IDLE_WAIT_S
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
            # Never below MIN_IDLE_WAIT_S: a run due sooner than that still wakes it.
            self._idle_wait_s = max(
                self.MIN_IDLE_WAIT_S, min(self._idle_wait_s, run.settings.heartbeat_every_s)
            )
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
                    self._wake_at = min(wake, now + self._idle_wait_s)
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
            if now >= run.deadline and run.timeout_s is not None:
                self._tell(run, timed_out_reason(run.timeout_s), now)
            elif silent >= run.fence_s:
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
