"""One scan's run, start to finish, with no Celery in sight.

``execute_scan(scan_id)`` is what the Celery task calls.  This module owns the
run's state machine (every arrow a compare-and-set in
:mod:`scanqueue.db.store`, keyed on the scan, the attempt and this process's
worker id):

    message ──start_run── own scan not queued+dispatched ──▶ SKIPPED (duplicate or
               │                                    stale message; ack, do nothing)
               │ won: the own scan, or a dispatched one of higher priority
               │      (the own scan is then released for a new message)
               ▼
            running ── runner returns ──▶ finish_run(completed, findings_count)   COMPLETED
               │   ── runner raises  ──▶ retries left (and not PermanentError):
               │                         retry_run (→ queued, run_after)          RETRYING
               │                         else finish_run(failed, exception text)  FAILED
               │   ── bad row        ──▶ finish_run(failed, error=what is malformed)
               │   ── timed out      ──▶ as a failure, error "timed out after N s"
               │                         (past the grace: written by overdue, then
               │                         the pool process ends)
               │   ── told to stop   ──▶ hand_back_run (running → queued)         REQUEUED
               │                         or, when the scan was canceled or moved
               │                         on, nothing                  CANCELED / LOST
               │                         (a run told to stop never completes)
               └─ the lease keeper (:mod:`scanqueue.worker.lease`) heartbeats while
                  the runner runs, and tells the run to stop when the row was
                  canceled or re-queued, or the lease is in doubt; past the grace
                  period it ends the pool process (``RunEnding.overdue`` reports
                  the run's end first).

The endings themselves (writes, events, retries) are
:mod:`scanqueue.worker.endings`.

A finish whose compare-and-set fails (the row moved on meanwhile) is discarded:
CANCELED if the scan was canceled, else LOST.

A :class:`~scanqueue.observe.observer.ScanObserver` hears each step (events, metrics,
lineage, logs); the database write always comes first.
"""

from __future__ import annotations

import logging
import time

from scanqueue.db.rows import StartedRun
from scanqueue.db.schema import STATUS_COMPLETED, STATUS_FAILED
from scanqueue.db.store import Store
from scanqueue.errors import MalformedRowError
from scanqueue.identity import worker_identity
from scanqueue.observe.observer import NULL_OBSERVER, RunInfo, ScanObserver
from scanqueue.runners.api import Job, Runner, ScanContext, ScanResult
from scanqueue.worker.endings import ExecutionSettings, Outcome, RunEnding
from scanqueue.worker.lease import LeaseKeeper, was_timed_out
from scanqueue.worker.successor import Successors

__all__ = ["ExecutionSettings", "Outcome", "execute_scan"]

log = logging.getLogger(__name__)


def execute_scan(
    scan_id: str,
    *,
    store: Store,
    runner: Runner,
    settings: ExecutionSettings,
    observer: ScanObserver = NULL_OBSERVER,
    successors: Successors | None = None,
) -> Outcome:
    """Run the scan this message starts, if any (docs/reference.md#lifecycle).

    The message is a start token: it starts its own scan, or a dispatched scan of
    higher priority in its place (its own then waits for a message of its own);
    nothing when its own scan is not queued and dispatched.  Everything after the
    start is about the started scan.  With ``successors`` the start may also claim
    the next scan of the dispatch window, whose message is sent before the run and
    confirmed after its end (:mod:`scanqueue.worker.successor`).
    """
    worker_id = worker_identity()
    started = store.start_run(
        scan_id, worker_id, successor=successors.wanted() if successors is not None else None
    )
    if started is None:
        log.info("scan %s is not queued and dispatched; message ignored", scan_id)
        return Outcome.SKIPPED
    sent = (
        successors.send_early(started.successor_id)
        if successors is not None and started.successor_id is not None
        else None
    )
    try:
        return _run_started(
            scan_id,
            started,
            store=store,
            runner=runner,
            settings=settings,
            observer=observer,
            successors=successors,
            successor_sent=sent is not None and not sent.failed_at_once,
            worker_id=worker_id,
        )
    finally:
        if sent is not None:
            # Read once the run's end is written: the broker answered meanwhile, so the
            # round trip cost the run nothing (a message that did not go is released).
            sent.settle()


def _run_started(
    scan_id: str,
    started: StartedRun,
    *,
    store: Store,
    runner: Runner,
    settings: ExecutionSettings,
    observer: ScanObserver,
    successors: Successors | None,
    successor_sent: bool,
    worker_id: str,
) -> Outcome:
    """Everything after the start: the run, its lease and its end."""
    info = RunInfo.from_started(started, successor_sent=successor_sent)
    clock = time.monotonic()
    if started.scan_id == scan_id:
        log.info("scan %s attempt %d started", started.scan_id, started.attempt)
    else:
        log.info(
            "scan %s attempt %d started by the message of scan %s (lower priority; it is"
            " released for a message of its own)",
            started.scan_id,
            started.attempt,
            scan_id,
        )
    observer.started(info)
    timeout_s = _timeout_of(started, settings)
    run = RunEnding(store, observer, info, clock, settings, worker_id, started.retries, timeout_s)

    try:
        job = _job_from(started)
    except MalformedRowError as exc:
        return run.finish(STATUS_FAILED, error=str(exc))

    ctx = ScanContext(
        started.scan_id, started.attempt, emit=lambda t, p: observer.event(info, t, p)
    )
    keeper = LeaseKeeper(
        store, ctx, settings, on_overdue=run.overdue, worker_id=worker_id, timeout_s=timeout_s
    )
    result: ScanResult | None = None
    failure: Exception | None = None
    keeper.start()
    try:
        try:
            result = runner.run(job, ctx)
        except Exception as exc:
            failure = exc
    finally:
        # Every way out, including BaseException (a shutdown), leaves the lease thread.
        keeper.stop()
    if successors is not None:
        successors.ran(time.monotonic() - clock)
    if ctx.cancelled:
        # Whatever the runner returned or raised: a run told to stop never completes.
        if was_timed_out(ctx):
            return run.timed_out(ctx)
        return run.after_stop(ctx)
    if failure is not None:
        return run.fail_or_retry(_error_text(failure), failure)
    return run.finish(STATUS_COMPLETED, findings=_findings_count(result, ctx))


def _timeout_of(started: StartedRun, settings: ExecutionSettings) -> float | None:
    """The run's time limit: the row's timeout_seconds, else SCANQUEUE_SCAN_TIMEOUT; a
    value of 0 (or below) means none."""
    limit = started.timeout_seconds
    chosen = float(limit) if limit is not None else settings.scan_timeout_s
    return chosen if chosen > 0 else None


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
