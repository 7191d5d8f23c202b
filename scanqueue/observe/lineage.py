"""OpenLineage run events for scans (docs/reference.md#events), sent only when configured.

This module owns the lineage observer: ``START`` when a run starts,
``COMPLETE``/``FAIL`` when it finishes and ``ABORT`` when it is canceled or its
outcome is discarded (the spec wants one terminal event per run); the bridge
sends ``ABORT``/``FAIL`` for a run the reaper took back from a dead worker.  Job
namespace ``scanqueue``, job name ``scan``; the run id is a uuid5 of
``(scan_id, attempt)``, so a re-sent event names the same run; the run facet
``scanqueue`` holds scan id, attempt, providers and frameworks — never the token.

Configuration is the OpenLineage client's own (``OPENLINEAGE_URL``,
``OPENLINEAGE__TRANSPORT__…``, ``OPENLINEAGE_CONFIG``); without it
:func:`lineage_observer` returns None and nothing is sent.  The observer is
called after each database transition has committed; it only queues the event,
and one background thread per process sends them in order, so an unreachable
receiver (retried by the client's transport, then logged) never fails or
delays a scan.  The queue is bounded: past it, events are dropped and counted.

A pool process leaves with ``os._exit`` (no ``atexit``): the worker's
``worker_process_shutdown`` hook calls :func:`flush_all`, and a run terminated
past its grace period queues its ``ABORT`` and flushes before the process ends.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attr
from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
from openlineage.client.facet_v2 import RunFacet, error_message_run

from scanqueue.config import lineage_configured as config_lineage_configured
from scanqueue.db.schema import STATUS_CANCELED, STATUS_COMPLETED

if TYPE_CHECKING:
    from scanqueue.db.rows import FinishedRun
    from scanqueue.observe.observer import RunInfo

log = logging.getLogger(__name__)

NAMESPACE = "scanqueue"
JOB_NAME = "scan"
PRODUCER = "https://github.com/scanqueue/scanqueue"
FACET_SCHEMA_URL = "https://github.com/scanqueue/scanqueue/blob/main/docs/api.md#lineage"
RUN_ID_NAMESPACE = uuid.UUID("6c1f4a52-3f7e-4c53-9d8e-5ca7ae0e0001")
QUEUE_MAX = 1000
LOST_RUN_ERROR = "worker lost"  # as the reaper's scan.failed event and the row say
FLUSH_AT_EXIT_S = 2.0

dropped = 0
"""Lineage events this process dropped (queue full) or failed to send."""
_dropped_lock = threading.Lock()


@attr.define
class ScanqueueRunFacet(RunFacet):
    """The ``scanqueue`` run facet."""

    scan_id: str
    attempt: int
    providers: list[str] = attr.field(factory=list)
    frameworks: list[str] = attr.field(factory=list)

    @staticmethod
    def _get_schema() -> str:
        return FACET_SCHEMA_URL


def run_id(scan_id: str, attempt: int) -> str:
    """The OpenLineage run id of one attempt of one scan (the same on every host)."""
    return str(uuid.uuid5(RUN_ID_NAMESPACE, f"{scan_id}:{attempt}"))


def build_run_event(
    state: RunState, run: RunInfo, *, error: str | None = None, when: datetime | None = None
) -> RunEvent:
    facets: dict[str, RunFacet] = {
        "scanqueue": ScanqueueRunFacet(
            scan_id=run.scan_id,
            attempt=run.attempt,
            providers=list(run.providers),
            frameworks=list(run.frameworks),
            producer=PRODUCER,
        )
    }
    if error:
        facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=error, programmingLanguage="python", producer=PRODUCER
        )
    return RunEvent(
        eventType=state,
        eventTime=(when or datetime.now(UTC)).isoformat(),
        run=Run(runId=run_id(run.scan_id, run.attempt), facets=facets),
        job=Job(namespace=NAMESPACE, name=JOB_NAME),
        producer=PRODUCER,
        inputs=[],
        outputs=[],
    )


def lineage_configured(environ: Mapping[str, str] | None = None) -> bool:
    return config_lineage_configured(os.environ if environ is None else environ)


def lineage_observer() -> LineageObserver | None:
    """The lineage observer when OpenLineage is configured, else None."""
    if not lineage_configured():
        return None
    return LineageObserver()


def _default_client() -> Any:
    from openlineage.client import OpenLineageClient

    return OpenLineageClient()


def _count_drop() -> None:
    global dropped
    with _dropped_lock:
        dropped += 1


_observers: weakref.WeakSet[LineageObserver] = weakref.WeakSet()


def flush_all(timeout_s: float = FLUSH_AT_EXIT_S) -> bool:
    """Send what every lineage observer of this process has queued, within ``timeout_s``
    in all; True if everything went.  For a pool process about to end (autoscale
    shrink, shutdown, a run terminated past its grace), which skips ``atexit``."""
    deadline = time.monotonic() + timeout_s
    sent = True
    for observer in list(_observers):
        sent = observer.flush(max(0.0, deadline - time.monotonic())) and sent
    return sent


class LineageObserver:
    """A :class:`~scanqueue.observe.observer.ScanObserver`: run events queued for a sender."""

    def __init__(
        self, client_factory: Callable[[], Any] = _default_client, queue_max: int = QUEUE_MAX
    ) -> None:
        _observers.add(self)
        self._client_factory = client_factory
        self._client: Any = None
        self._queue: queue.Queue[RunEvent | None] = queue.Queue(maxsize=queue_max)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._receiver_down = False

    # -- ScanObserver -----------------------------------------------------------------

    def started(self, run: RunInfo) -> None:
        self._submit(build_run_event(RunState.START, run))

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        pass

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        if row.status == STATUS_COMPLETED:
            self._submit(build_run_event(RunState.COMPLETE, run))
        elif row.status == STATUS_CANCELED:
            self._submit(build_run_event(RunState.ABORT, run))
        else:
            self._submit(build_run_event(RunState.FAIL, run, error=row.error))

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        # Stopped, or the lease went to another run: this run ends without an outcome.
        self._submit(build_run_event(RunState.ABORT, run))

    def canceled(self, run: RunInfo, duration_s: float) -> None:
        self._submit(build_run_event(RunState.ABORT, run))

    def lost(self, run: RunInfo, requeued: bool) -> None:
        """The reaper took back a run whose worker died: its terminal event.

        ``ABORT`` when the scan was re-queued (the next attempt is a run of its
        own), ``FAIL`` when it was failed for good.  Sent by the bridge, which
        knows only the scan id and attempt, so the facet's lists are empty; the
        run id ties the event to the run's ``START``.
        """
        if requeued:
            self._submit(build_run_event(RunState.ABORT, run))
        else:
            self._submit(build_run_event(RunState.FAIL, run, error=LOST_RUN_ERROR))

    # -- sending ------------------------------------------------------------------------

    def _submit(self, event: RunEvent) -> None:
        self._ensure_thread()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            _count_drop()
            log.warning(
                "OpenLineage %s event for run %s dropped: %d events already waiting",
                event.eventType.value if event.eventType else "?",
                event.run.runId,
                self._queue.maxsize,
            )

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            if self._pid != os.getpid():
                # A forked child inherits the queue but not the thread; start afresh.
                self._queue = queue.Queue(maxsize=self._queue.maxsize)
                self._client = None
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="openlineage", daemon=True)
            self._thread.start()
            atexit.register(self.flush, FLUSH_AT_EXIT_S)

    def _loop(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                self._send(event)
            finally:
                self._queue.task_done()

    def _send(self, event: RunEvent) -> None:
        kind = event.eventType.value if event.eventType else "?"
        try:
            if self._client is None:
                self._client = self._client_factory()
            self._client.emit(event)
        except Exception as exc:
            _count_drop()
            if not self._receiver_down:
                log.warning(
                    "OpenLineage %s event for run %s not delivered: %s",
                    kind,
                    event.run.runId,
                    _describe(exc),
                )
            self._receiver_down = True
            return
        if self._receiver_down:
            log.info("OpenLineage receiver reachable again")
            self._receiver_down = False

    def flush(self, timeout_s: float = FLUSH_AT_EXIT_S) -> bool:
        """Wait up to ``timeout_s`` for queued events to be sent; True if all were."""
        done = threading.Event()

        def _join() -> None:
            self._queue.join()
            done.set()

        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            # Nothing sends in this process (a forked child that queued nothing yet).
            return self._pid != os.getpid() or self._queue.empty()
        threading.Thread(target=_join, daemon=True).start()
        return done.wait(timeout_s)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
