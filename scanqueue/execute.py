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

A :class:`~scanqueue.observe.ScanObserver` hears each step (events, metrics,
lineage, logs); the database write always comes first.
"""

from __future__ import annotations

import enum
import logging
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
    """Renews a run's heartbeat; tells the runner to stop, then ends it if it will not.

    Runs as a daemon thread beside the runner, in the same process.
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
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"lease-{ctx.scan_id[:12]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        last_renewed = time.monotonic()
        fence_after = self.settings.lease_s * SELF_FENCE_SHARE
        while not self._done.wait(self.settings.heartbeat_every_s):
            try:
                if self.store.heartbeat(self.ctx.scan_id, self.ctx.attempt):
                    last_renewed = time.monotonic()
                    continue
                current = self.store.status_of(self.ctx.scan_id)
                if current and current[0] == STATUS_CANCELED:
                    reason = "canceled"
                else:
                    reason = f"lease lost (scan is now {current[0] if current else 'gone'})"
            except ScanqueueError as exc:
                if time.monotonic() - last_renewed < fence_after:
                    log.warning("heartbeat of scan %s failed: %s", self.ctx.scan_id, exc)
                    continue
                reason = "lease lost (database unreachable)"
            except Exception:
                log.exception("heartbeat of scan %s failed", self.ctx.scan_id)
                continue
            log.info(
                "scan %s attempt %d told to stop: %s", self.ctx.scan_id, self.ctx.attempt, reason
            )
            self.ctx.request_stop(reason)
            break
        else:
            return
        if self._done.wait(self.settings.cancel_grace_s):
            return
        self.on_overdue(self.ctx)


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
