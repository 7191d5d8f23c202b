"""How a started run ends: its database write first, then what the observers hear.

:class:`RunEnding` is one started run's ending, chosen by
:func:`scanqueue.worker.execute.execute_scan` (whose docstring draws the state
machine) and, for a run that ignored its stop past the grace, by the lease
thread's overdue hook:

- ``finish`` — ``completed`` or ``failed`` (a CAS on the run; lost → discarded);
- ``fail_or_retry`` — a failure: back to ``queued`` after a backoff while the
  scan has retries left (:mod:`scanqueue.worker.retry`), else ``failed``;
- ``timed_out`` — a run past its timeout: ``scan.timed_out``, then as a failure
  with error ``timed out after N s``;
- ``after_stop`` — told to stop otherwise: handed back, or nothing when the scan
  was canceled or moved on (a run told to stop never completes);
- ``overdue`` — the grace is over: a timed-out run's ending is recorded first,
  then the pool process is terminated.

Also :class:`Outcome` (what ``execute_scan`` returns) and
:class:`ExecutionSettings` (a run's timings and policies).
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from scanqueue.config import (
    DEFAULT_RETRY_BACKOFF_S,
    DEFAULT_SCAN_TIMEOUT_S,
    fence_margin_s,
    self_fence_after_s,
)
from scanqueue.db.engine import retry_with_backoff
from scanqueue.db.rows import iso
from scanqueue.db.schema import STATUS_CANCELED, STATUS_COMPLETED, STATUS_FAILED
from scanqueue.db.store import Store
from scanqueue.errors import UnavailableError
from scanqueue.observe.observer import RunInfo, ScanObserver
from scanqueue.runners.api import ScanContext
from scanqueue.worker import lease
from scanqueue.worker.lease import STOP_REASON_CANCELED, was_timed_out
from scanqueue.worker.retry import decide

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Outcome(enum.Enum):
    SKIPPED = "skipped"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REQUEUED = "requeued"  # told to stop while the lease was in doubt: handed back
    RETRYING = "retrying"  # failed with retries left: queued again after a backoff
    LOST = "lost"  # the lease went elsewhere: this run's outcome is void


@dataclass(frozen=True)
class ExecutionSettings:
    heartbeat_every_s: float
    lease_s: float
    cancel_grace_s: float
    # None: derived from the lease and the grace (self_fence_after_s).
    fence_after_s: float | None = None
    # Scan policies (docs/reference.md#policies): SCANQUEUE_MAX_RETRIES, SCANQUEUE_RETRY_BACKOFF and
    # SCANQUEUE_SCAN_TIMEOUT (0: none; a row's timeout_seconds wins).
    max_retries: int = 0
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    scan_timeout_s: float = DEFAULT_SCAN_TIMEOUT_S

    @property
    def fence_s(self) -> float:
        if self.fence_after_s is not None:
            return self.fence_after_s
        return self_fence_after_s(self.lease_s, self.cancel_grace_s)


class RunEnding:
    """One started run's ending: its database write, then what the observers hear."""

    def __init__(
        self,
        store: Store,
        observer: ScanObserver,
        info: RunInfo,
        clock: float,
        settings: ExecutionSettings,
        worker_id: str,
        retries: int = 0,
        timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.observer = observer
        self.info = info
        self.clock = clock
        self.settings = settings
        self.worker_id = worker_id
        self.retries = retries
        self.timeout_s = timeout_s
        # Set when the write must be done sooner than the fence (see overdue).
        self._write_within_s: float | None = None
        self._ended = threading.Lock()
        self._reported = False
        self._timeout_reported = False

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
        row = self._write(
            lambda: self.store.finish_run(
                info.scan_id,
                info.attempt,
                status,
                error=error,
                findings_count=findings,
                worker_id=self.worker_id,
            )
        )
        if row is None:
            return self._lost(status, duration)
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

    def _write(self, call: Callable[[], _T]) -> _T:
        # A database blip must not strand the row as 'running' until the reaper: retry
        # while this run's lease would still hold (the write is a CAS, so a retry after
        # a lost reply just finds the row already written).
        return retry_with_backoff(
            call,
            timeout_s=self._write_within_s or self.settings.fence_s,
            what=f"the database to record scan {self.info.scan_id}",
        )

    def _lost(self, status: str, duration: float) -> Outcome:
        """The run's ending found the row moved on (canceled, reaped): discard it."""
        info = self.info
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

    def fail_or_retry(self, error: str, exc: BaseException | None) -> Outcome:
        """A failed run (``exc`` None: it timed out): back to ``queued`` after a backoff
        while the scan has retries left (:mod:`scanqueue.worker.retry`), else ``failed``."""
        settings = self.settings
        decision = decide(
            exc,
            retries=self.retries,
            max_retries=settings.max_retries,
            base_s=settings.retry_backoff_s,
        )
        if decision.delay_s is None:
            return self.finish(STATUS_FAILED, error=error)
        info, delay_s = self.info, decision.delay_s
        duration = time.monotonic() - self.clock
        retried = self._write(
            lambda: self.store.retry_run(
                info.scan_id, info.attempt, error=error, delay_s=delay_s, worker_id=self.worker_id
            )
        )
        if retried is None:
            return self._lost("retrying", duration)
        log.warning(
            "scan %s attempt %d failed (retry %d of %d in %.1fs): %s",
            info.scan_id,
            info.attempt,
            retried.retries,
            settings.max_retries,
            delay_s,
            error,
        )
        self.observer.event(
            info,
            "scan.retrying",
            {
                "delay_s": round(delay_s, 3),
                "error": error,
                "retries": retried.retries,
                "max_retries": settings.max_retries,
                "run_after": iso(retried.run_after),
            },
        )
        # This run ended without an outcome of its own: the scan runs again.
        self._discard(duration, canceled=False)
        return Outcome.RETRYING

    def timed_out(self, ctx: ScanContext) -> Outcome:
        """The run ran past its timeout and stopped (or was stopped): a failure, whatever
        the runner returned, with error ``timed out after N s``."""
        reason = ctx.stop_reason or lease.STOP_REASON_TIMED_OUT
        with self._ended:
            first, self._timeout_reported = not self._timeout_reported, True
        if first:
            # A fact whoever records the ending (the overdue hook or the run's thread
            # may both get here), so said once, before its scan.failed/scan.retrying.
            self.observer.event(self.info, "scan.timed_out", {"timeout_s": self.timeout_s})
        return self.fail_or_retry(reason, None)

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
        if was_timed_out(ctx):
            self._end_overdue_timeout(ctx)
        elif lease.terminate_process_when_overdue:
            # This process is about to end: the run's terminal events (lineage ABORT,
            # metrics) now or never, within the fence's margin.
            self._discard(
                time.monotonic() - self.clock, canceled=ctx.stop_reason == STOP_REASON_CANCELED
            )
            lineage = sys.modules.get("scanqueue.observe.lineage")  # loaded only when configured
            if lineage is not None:
                lineage.flush_all(fence_margin_s(self.settings.lease_s) / 2)
        lease.terminate_overdue_run(ctx)

    def _end_overdue_timeout(self, ctx: ScanContext) -> None:
        """A timed-out run that ignored its stop: record its ending (failed, or queued
        for a retry) before it is terminated, so the slot is free at once rather than
        when the reaper finds the row.  The row still belongs to this run (the scan
        was neither canceled nor taken back), so the write is this run's own CAS."""
        if not lease.terminate_process_when_overdue:
            # It cannot be terminated here (not a prefork child): end the scan in a
            # thread of its own (the lease thread must not wait on the database); the
            # run's own ending, whenever the runner returns, then finds the row
            # moved on and is discarded.
            threading.Thread(
                target=self._record_timeout,
                args=(ctx,),
                name=f"scanqueue-timeout-{self.info.scan_id}",
                daemon=True,
            ).start()
            return
        # Its heartbeats stopped when it was told to stop: the write must land well
        # before the lease can pass elsewhere (fence + grace + margin < lease).
        budget = fence_margin_s(self.settings.lease_s) / 2
        self._write_within_s = budget
        self._record_timeout(ctx)
        # This process is about to end: what the run's ending queued (events, lineage)
        # now or never, within the fence's margin.
        flush_events = sys.modules.get("scanqueue.observe.event_sender")
        if flush_events is not None:
            flush_events.flush_pending_events(budget)
        lineage = sys.modules.get("scanqueue.observe.lineage")  # loaded only when configured
        if lineage is not None:
            lineage.flush_all(budget)

    def _record_timeout(self, ctx: ScanContext) -> None:
        try:
            self.timed_out(ctx)
        except Exception:
            # The reaper takes the scan back once its lease runs out.
            log.exception("could not record the timeout of scan %s", self.info.scan_id)

    def _discard(self, duration: float, *, canceled: bool) -> None:
        if not self._report_end_once():
            return
        hook = getattr(self.observer, "canceled", None) if canceled else None
        if callable(hook):
            hook(self.info, duration)
        else:
            self.observer.discarded(self.info, duration)
