"""Writing scan events without failing or slowing a scan.

This module owns the way events leave a process.  :class:`EventObserver` turns
a run's lifecycle into events off the scan's critical path: its
:class:`BackgroundEmitter` queues them (the time and fields fixed when they
happen) and one sender thread per process (and sink) writes them in batches,
in order.  :func:`flush_pending_events` waits for what is queued; the pool
process exit path and ``atexit`` call it, and a forked child starts with empty
queues.  A sink that fails never fails or slows a scan: the event is dropped,
logged and counted (:data:`emit_failures`, ``scanqueue_events_dropped_total``).
:func:`emit_standalone` (CLI, API) writes at once through a
:class:`SafeEmitter` and returns the id.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from scanqueue.config import Settings
from scanqueue.db.schema import STATUS_CANCELED, STATUS_COMPLETED, STATUS_FAILED
from scanqueue.observe.event_sinks import event_sink_for
from scanqueue.observe.events import EventSink, encode_event

if TYPE_CHECKING:
    from scanqueue.db.rows import FinishedRun
    from scanqueue.observe.observer import RunInfo

log = logging.getLogger(__name__)

# After a failed write, later events are dropped at once for this long instead of
# each one waiting out a socket timeout: a dead sink must not slow a scan down.
FAILURE_BACKOFF_S = 3.0
# Events waiting for the sender thread; beyond this a sink that cannot keep up
# costs events, not memory or scan time.
MAX_QUEUED = 10_000
MAX_BATCH = 500
# After the first event of a batch, the sender waits this long for the ones that
# follow closely (a short scan's start and end, the next scan's start) and writes
# them in one round trip.  Per event, a write of its own cost about 0.4 ms of a
# pool process's CPU at no-op speed; subscribers see events this much later.
BATCH_LINGER_S = 0.005
# While events keep coming (the last write ended less than BUSY_WITHIN_S ago: a busy
# pool process's runs), the sender looks for events this often instead, without
# being woken by them.  A write costs about 0.1 ms of CPU, nearly all of it the round
# trip, and 10-20 µs more per event in it; at no-op speed, batches of 4 events cost a
# scan 0.18 ms of the sender thread's CPU and batches of 10-15 about 0.10 ms.  After a
# quiet spell the first events go out after BATCH_LINGER_S, so a scan's events at
# idle (and the order of a bridge's scan.queued before the run's scan.started)
# are as before.
BUSY_LINGER_S = 0.02
BUSY_WITHIN_S = 0.05
EXIT_FLUSH_S = 2.0

emit_failures = 0
"""Events this process could not record (the sink raised or was backing off)."""
_failures_lock = threading.Lock()


def _count_failure() -> None:
    global emit_failures
    with _failures_lock:
        emit_failures += 1
    global _failure_counter
    try:
        if _failure_counter is None:
            # Created on first use, not at import: prometheus_client fixes a metric's
            # (multiprocess or not) mode when it is created.
            from prometheus_client import Counter

            _failure_counter = Counter(
                "scanqueue_events_dropped",
                "Scan events that could not be recorded (event sink unreachable or failing).",
            )
        _failure_counter.inc()
    except Exception:  # a metrics problem must not become an event problem
        log.debug("could not count a dropped event", exc_info=True)


_failure_counter: Any = None


# -- writing without failing -------------------------------------------------------------


class SafeEmitter:
    """Writes to a sink; a failure is logged and counted, never raised.

    After a failure, events are dropped straight away for a short while, so a
    sink that hangs until its socket timeout costs a scan one timeout, not one
    per event.
    """

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._down_until = 0.0
        self._lock = threading.Lock()

    def emit(self, event_type: str, scan_id: str, payload: Mapping[str, Any]) -> str | None:
        if time.monotonic() < self._down_until:
            _count_failure()
            return None
        try:
            return self.sink.emit(event_type, scan_id, payload)
        except Exception as exc:
            with self._lock:
                first = time.monotonic() >= self._down_until
                self._down_until = time.monotonic() + FAILURE_BACKOFF_S
            _count_failure()
            if first:
                log.warning(
                    "event %s for scan %s dropped: %s unreachable (%s); dropping events for %gs",
                    event_type,
                    scan_id,
                    self.sink.description,
                    _describe(exc),
                    FAILURE_BACKOFF_S,
                )
            return None


def _describe(exc: BaseException) -> str:
    text_ = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text_[:300]


class BackgroundEmitter:
    """Queues events for one sender thread that writes them to a sink in batches.

    :meth:`emit` never waits on the sink: it encodes the event as stored (``at``
    is the moment of the call; :func:`~scanqueue.observe.events.encode_event`) and
    puts the text on a bounded queue.  The thread, started on the first event,
    waits ``linger_s`` after the first event of a batch, takes what is queued by
    then (up to ``max_batch``) and writes it with one
    :meth:`EventSink.write_encoded`.  While events keep coming it instead looks
    every ``busy_linger_s`` (:data:`BUSY_LINGER_S`), so that no emit has to wake
    it.  A single thread and a FIFO queue keep each caller's events in the order
    they happened.

    Failures follow :class:`SafeEmitter`: a batch that cannot be written is
    dropped, counted event by event and logged once, and for
    :data:`FAILURE_BACKOFF_S` afterwards events are dropped straight away.  A
    full queue drops the event too.  Use :func:`background_emitter_for`, so a
    process has one queue and one thread per sink.
    """

    def __init__(
        self,
        sink: EventSink,
        max_queued: int = MAX_QUEUED,
        max_batch: int = MAX_BATCH,
        linger_s: float = BATCH_LINGER_S,
        busy_linger_s: float = BUSY_LINGER_S,
    ) -> None:
        self.sink = sink
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.busy_linger_s = busy_linger_s
        self._down_until = 0.0
        self._full_warned_until = 0.0
        self._fresh()
        with _emitters_lock:
            _all_emitters.add(self)

    def _fresh(self) -> None:
        """An empty queue, no thread yet (at creation, and in a forked child)."""
        self._queue: queue.Queue[str] = queue.Queue(self.max_queued)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Counts of events queued and written-or-dropped by the thread: what flush waits on.
        self._progress = threading.Condition(threading.Lock())
        self._queued = 0
        self._handled = 0

    def emit(self, event_type: str, scan_id: str, payload: Mapping[str, Any]) -> bool:
        """Queue an event; False when it was dropped instead (and counted)."""
        if time.monotonic() < self._down_until:
            _count_failure()
            return False
        body = encode_event(event_type, scan_id, payload)
        if self._thread is None:
            self._start()
        with self._progress:
            try:
                self._queue.put_nowait(body)
            except queue.Full:
                full = True
            else:
                full = False
                self._queued += 1
        if full:
            _count_failure()
            self._warn_full()
            return False
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until every event queued before this call is written or dropped.

        Returns False if that took longer than ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._progress:
            target = self._queued
            while self._handled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    @property
    def pending(self) -> int:
        """Events queued and not yet written or dropped."""
        with self._progress:
            return self._queued - self._handled

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._send_forever, args=(self._queue,), name="scanqueue-events"
                )
                # Never holds up an exit: the exit paths flush, with a bounded wait.
                thread.daemon = True
                thread.start()
                self._thread = thread

    def _send_forever(self, pending: queue.Queue[str]) -> None:
        last_write = -math.inf  # nothing written yet: the first batch is not busy
        while True:
            if self.busy_linger_s > 0 and time.monotonic() - last_write < BUSY_WITHIN_S:
                # Busy: look again after the linger rather than wait on the queue, so
                # that an emit, on a run's critical path, never has to wake this
                # thread (a system call, and on a busy machine often the CPU).  After
                # BUSY_WITHIN_S without a write the thread waits on the queue again.
                time.sleep(self.busy_linger_s)
                if pending.empty():
                    continue
                batch = [pending.get_nowait()]
            else:
                batch = [pending.get()]
                if self.linger_s > 0:
                    time.sleep(self.linger_s)
            # This thread is the only consumer: not empty means get_nowait succeeds.
            while len(batch) < self.max_batch and not pending.empty():
                batch.append(pending.get_nowait())
            try:
                self._write(batch)
            finally:
                last_write = time.monotonic()
                with self._progress:
                    self._handled += len(batch)
                    self._progress.notify_all()

    def _write(self, batch: list[str]) -> None:
        if time.monotonic() < self._down_until:
            for _ in batch:
                _count_failure()
            return
        try:
            self.sink.write_encoded(batch)
        except Exception as exc:
            self._down_until = time.monotonic() + FAILURE_BACKOFF_S
            for _ in batch:
                _count_failure()
            first = json.loads(batch[0])
            log.warning(
                "%d event(s) dropped, first %s for scan %s: %s unreachable (%s); "
                "dropping events for %gs",
                len(batch),
                first.get("type"),
                first.get("scan_id"),
                self.sink.description,
                _describe(exc),
                FAILURE_BACKOFF_S,
            )

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now >= self._full_warned_until:
            self._full_warned_until = now + FAILURE_BACKOFF_S
            log.warning(
                "event dropped: %d events already waiting for %s",
                self.max_queued,
                self.sink.description,
            )


# Every emitter, for flushing and for resetting after a fork.
_all_emitters: weakref.WeakSet[BackgroundEmitter] = weakref.WeakSet()
# Keyed by id(sink): an entry lives as long as its emitter, which keeps its sink
# alive, so an id is never reused while its entry exists.
_by_sink: weakref.WeakValueDictionary[int, BackgroundEmitter] = weakref.WeakValueDictionary()
# Reentrant: creating an emitter under it registers the emitter.
_emitters_lock = threading.RLock()


def background_emitter_for(sink: EventSink) -> BackgroundEmitter:
    """This process's emitter for ``sink`` (one queue and one sender thread per sink)."""
    with _emitters_lock:
        found = _by_sink.get(id(sink))
        if found is None:
            found = _by_sink[id(sink)] = BackgroundEmitter(sink)
        return found


def flush_pending_events(timeout_s: float = EXIT_FLUSH_S) -> bool:
    """Wait (up to ``timeout_s`` in all) until this process's queued events are written."""
    deadline = time.monotonic() + timeout_s
    with _emitters_lock:
        emitters = list(_all_emitters)
    done = True
    for emitter in emitters:
        done = emitter.flush(max(0.0, deadline - time.monotonic())) and done
    return done


def _after_fork_in_child() -> None:
    # Only the forking thread survives a fork: the parent's sender threads, their
    # queued events (the parent writes those) and possibly held locks stay behind.
    global _emitters_lock
    _emitters_lock = threading.RLock()
    for emitter in list(_all_emitters):
        emitter._fresh()


def _flush_at_exit() -> None:
    with contextlib.suppress(Exception):  # an exit must not fail over events
        if not flush_pending_events(EXIT_FLUSH_S):
            log.warning("exiting with scan events not yet written (%gs timeout)", EXIT_FLUSH_S)


os.register_at_fork(after_in_child=_after_fork_in_child)
# Pool processes leave with os._exit, skipping this: they flush on
# worker_process_shutdown (scanqueue.worker.app).
atexit.register(_flush_at_exit)


class EventObserver:
    """A run's lifecycle and runner reports, as events (a :class:`ScanObserver`).

    Events are queued, not written, when a method returns: :meth:`flush` (or
    :func:`flush_pending_events`) waits for them.
    """

    def __init__(self, sink: EventSink) -> None:
        self.emitter = background_emitter_for(sink)
        # Connect now (pool processes build their observers at start) so the first
        # scan's scan.started does not carry the connection set-up.
        try:
            sink.ping()
        except Exception as exc:
            log.warning("event sink %s not reachable yet: %s", sink.description, _describe(exc))

    def started(self, run: RunInfo) -> None:
        self.emitter.emit(
            "scan.started",
            run.scan_id,
            {"attempt": run.attempt, "providers": run.providers, "frameworks": run.frameworks},
        )

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        self.emitter.emit(event_type, run.scan_id, {**payload, "attempt": run.attempt})

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        payload: dict[str, Any] = {
            "attempt": run.attempt,
            "status": row.status,
            "findings_count": row.findings_count,
            "duration_s": round(duration_s, 6),
        }
        if row.status == STATUS_COMPLETED:
            event_type = "scan.completed"
            # Against the baseline (docs/reference.md#findings-over-time); None when no diff was
            # computed.
            payload["findings_new"] = row.findings_new
            payload["findings_fixed"] = row.findings_fixed
        elif row.status == STATUS_FAILED:
            event_type = "scan.failed"
            payload["error"] = row.error
        elif row.status == STATUS_CANCELED:
            event_type = "scan.canceled"
            payload["reason"] = row.error
        else:
            log.warning("scan %s finished with unexpected status %r", run.scan_id, row.status)
            return
        self.emitter.emit(event_type, run.scan_id, payload)

    def flush(self, timeout_s: float = EXIT_FLUSH_S) -> bool:
        """Wait until the events of runs so far are written (False on timeout)."""
        return self.emitter.flush(timeout_s)

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        # Canceled: whoever canceled emitted scan.canceled.  Lease lost: the next
        # attempt emits its own scan.started.
        pass


def emit_standalone(
    settings: Settings, event_type: str, scan_id: str, payload: Mapping[str, Any]
) -> str | None:
    """Record one event from outside a run (CLI, API); never raises, returns the id or None."""
    try:
        sink = event_sink_for(settings)
    except Exception as exc:
        _count_failure()
        log.warning("event %s for scan %s dropped: %s", event_type, scan_id, _describe(exc))
        return None
    return SafeEmitter(sink).emit(event_type, scan_id, payload)
