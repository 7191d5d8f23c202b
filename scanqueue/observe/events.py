"""Scan events (CONTRACT §5): where they are written, and how they are read back in order.

This module owns the event log.  With ``REDIS_URL`` it is a capped Redis stream
(``scanqueue:{queue}:events``, ``XADD MAXLEN ~ N``); without it, the
``scanqueue_events`` table, pruned to about the same retention.  Either way an
event is a JSON object with ``id``, ``type``, ``scan_id``, ``at`` (ISO-8601
UTC) and its payload fields, and ids only grow, so a reader resumes after the
last id it saw (``read_after``) — that is what ``GET /api/v1/events`` and its
``Last-Event-ID`` resume are built on.

:class:`EventObserver` turns a run's lifecycle into events off the scan's
critical path: its :class:`BackgroundEmitter` queues them (the time and fields
fixed when they happen) and one sender thread per process (and sink) writes
them in batches, in order.  :func:`flush_pending_events` waits for what is queued; the
pool process exit path and ``atexit`` call it.  A sink that fails never fails
or slows a scan: the event is dropped, logged and counted
(:data:`emit_failures`).  :func:`emit_standalone` (CLI, API) writes at once and
returns the id.  The token never reaches an event.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import delete, insert, select, text

from scanqueue.config import Settings, mask_url
from scanqueue.db.schema import STATUS_CANCELED, STATUS_COMPLETED, STATUS_FAILED
from scanqueue.db.schema import events as events_table

if TYPE_CHECKING:
    import redis

    from scanqueue.db.store import ScanRow, Store
    from scanqueue.observe.observer import RunInfo

log = logging.getLogger(__name__)

# After a failed write, later events are dropped at once for this long instead of
# each one waiting out a socket timeout: a dead sink must not slow a scan down.
FAILURE_BACKOFF_S = 3.0
TABLE_POLL_EVERY_S = 0.2
PG_LOCK_TIMEOUT_MS = 2000
# Events waiting for the sender thread; beyond this a sink that cannot keep up
# costs events, not memory or scan time.
MAX_QUEUED = 10_000
MAX_BATCH = 500
# After the first event of a batch, the sender waits this long for the ones that
# follow closely (a short scan's start and end, the next scan's start) and writes
# them in one round trip.  Per event, a write of its own cost about 0.4 ms of a
# pool process's CPU at no-op speed; subscribers see events this much later.
BATCH_LINGER_S = 0.005
EXIT_FLUSH_S = 2.0
# Keys every event carries; a payload field with one of these names is kept
# under ``payload_<name>`` rather than overwriting it.
RESERVED_KEYS = frozenset({"id", "type", "scan_id", "at", "attempt"})
SECRET_KEYS = frozenset({"triggered_by_token", "token"})

EVENT_TYPES = (
    "scan.started",
    "scan.progress",
    "scan.finding",
    "scan.completed",
    "scan.failed",
    "scan.canceled",
)

emit_failures = 0
"""Events this process could not record (the sink raised or was backing off)."""
_failures_lock = threading.Lock()


@dataclass(frozen=True)
class Event:
    """One recorded event; ``data`` is the JSON object subscribers receive (with ``id``)."""

    id: str
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type", ""))

    @property
    def scan_id(self) -> str:
        return str(self.data.get("scan_id", ""))

    def to_json(self) -> str:
        return json.dumps(self.data, default=str, separators=(",", ":"))


class EventSink(Protocol):
    """An ordered, capped, resumable event log."""

    zero_id: str
    """An id that sorts before every event: ``read_after(zero_id)`` reads from the start."""

    def emit(self, event_type: str, scan_id: str, payload: Mapping[str, Any]) -> str:
        """Append an event; return its id.  Raises when the sink is unreachable."""
        ...

    def write_batch(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        """Append already-built events (:func:`event_fields`) in order; return their ids.

        Raises when the sink is unreachable; then none or only some were written.
        """
        ...

    def read_after(self, last_id: str | None, limit: int) -> list[Event]:
        """Up to ``limit`` events after ``last_id`` (every retained one if None), oldest first."""
        ...

    def wait_after(self, last_id: str | None, limit: int, timeout_s: float) -> list[Event]:
        """Like :meth:`read_after`, but waits up to ``timeout_s`` for something to arrive."""
        ...

    def last_id(self) -> str:
        """The newest event's id (``zero_id`` when there is none)."""
        ...

    def sort_key(self, event_id: str) -> tuple[int, ...]:
        """Ids compared by order; raises ValueError for a malformed id."""
        ...

    def ping(self) -> None:
        """Raise unless the sink can be reached."""
        ...

    @property
    def description(self) -> str: ...


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def event_fields(event_type: str, scan_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The stored form of an event: payload fields, then the reserved keys (no id yet)."""
    fields: dict[str, Any] = {}
    for key, value in payload.items():
        if key in SECRET_KEYS:
            continue
        fields[f"payload_{key}" if key in RESERVED_KEYS and key != "attempt" else key] = value
    fields["type"] = event_type
    fields["scan_id"] = scan_id
    fields.setdefault("at", now_iso())
    return fields


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


# -- Redis stream --------------------------------------------------------------------


def _redis_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    if not ms.isdigit() or (seq and not seq.isdigit()):
        raise ValueError(f"not a stream id: {event_id!r}")
    return int(ms), int(seq or 0)


class RedisEventSink:
    """A capped Redis stream; ids are the stream's own ``<ms>-<seq>`` ids."""

    zero_id = "0-0"

    def __init__(self, client: redis.Redis, key: str, maxlen: int, url: str = "") -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self._url = url

    @property
    def description(self) -> str:
        return f"Redis stream {self.key} on {mask_url(self._url)}"

    def emit(self, event_type: str, scan_id: str, payload: Mapping[str, Any]) -> str:
        return self._xadd(event_fields(event_type, scan_id, payload))

    def write_batch(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        if len(items) <= 1:
            # The usual case when events trickle in; a pipeline costs more for one.
            return [self._xadd(fields) for fields in items]
        # One round trip; no MULTI, since each XADD stands on its own.
        pipe = self.client.pipeline(transaction=False)
        for fields in items:
            body = json.dumps(fields, default=str)
            pipe.xadd(self.key, {"e": body}, maxlen=self.maxlen, approximate=True)
        return [_text(new_id) for new_id in pipe.execute()]

    def _xadd(self, fields: Mapping[str, Any]) -> str:
        body = json.dumps(fields, default=str)
        new_id: Any = self.client.xadd(self.key, {"e": body}, maxlen=self.maxlen, approximate=True)
        return _text(new_id)

    def read_after(self, last_id: str | None, limit: int) -> list[Event]:
        start = "-" if last_id is None else f"({last_id}"
        entries: Any = self.client.xrange(self.key, start, "+", count=limit)
        return [self._event(i, f) for i, f in entries or []]

    def wait_after(self, last_id: str | None, limit: int, timeout_s: float) -> list[Event]:
        found = self.read_after(last_id, limit)
        if found or timeout_s <= 0:
            return found
        # XREAD BLOCK wakes as soon as an entry is added: no polling latency.
        answer: Any = self.client.xread(
            {self.key: last_id or self.zero_id}, count=limit, block=max(1, int(timeout_s * 1000))
        )
        events: list[Event] = []
        for _key, entries in answer or []:
            events.extend(self._event(i, f) for i, f in entries)
        return events

    def last_id(self) -> str:
        newest: Any = self.client.xrevrange(self.key, "+", "-", count=1)
        return _text(newest[0][0]) if newest else self.zero_id

    def sort_key(self, event_id: str) -> tuple[int, ...]:
        return _redis_key(event_id)

    def ping(self) -> None:
        self.client.ping()

    def _event(self, raw_id: Any, fields: Mapping[Any, Any]) -> Event:
        event_id = _text(raw_id)
        body = fields.get(b"e", fields.get("e"))
        try:
            data = json.loads(_text(body)) if body is not None else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {"value": data}
        data["id"] = event_id
        return Event(event_id, data)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- table -----------------------------------------------------------------------------


class TableEventSink:
    """The ``scanqueue_events`` table; ids are the autoincrement id as a string."""

    zero_id = "0"
    # Any constant works; it only has to be the same in every writer.
    PG_LOCK_KEY = 0x5CA_E7E7

    def __init__(self, store: Store, maxlen: int) -> None:
        self.store = store
        self.maxlen = maxlen
        self.prune_every = max(1, min(1000, maxlen // 10))

    @property
    def description(self) -> str:
        return f"table scanqueue_events in {self.store.masked_url}"

    def emit(self, event_type: str, scan_id: str, payload: Mapping[str, Any]) -> str:
        return self.write_batch([event_fields(event_type, scan_id, payload)])[0]

    def write_batch(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        if not items:
            return []
        rows = [_table_row(fields) for fields in items]
        with self.store._tx() as conn:
            if self.store.dialect == "postgresql":
                # Ids come from a sequence at insert time but become visible at commit;
                # two writers could commit out of id order and a reader that already
                # moved past the later id would never see the earlier one.  Serializing
                # writers makes commit order equal id order.
                # A writer frozen while holding the lock must not stall every scan's
                # events: waiting is bounded, and a timeout drops this batch.
                conn.execute(text(f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT_MS}ms'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self.PG_LOCK_KEY})
            if len(rows) == 1:
                stmt = insert(events_table).returning(events_table.c.id)
                new_ids = [int(conn.execute(stmt, rows[0]).scalar_one())]
            else:
                # sort_by_parameter_order: ids are taken in the order of ``rows`` and come
                # back in that order, also when SQLAlchemy sends them as one statement.
                stmt = insert(events_table).returning(
                    events_table.c.id, sort_by_parameter_order=True
                )
                new_ids = [int(i) for i in conn.execute(stmt, rows).scalars().all()]
            newest = max(new_ids)
            if newest > self.maxlen and any(i % self.prune_every == 0 for i in new_ids):
                conn.execute(delete(events_table).where(events_table.c.id <= newest - self.maxlen))
        return [str(i) for i in new_ids]

    def read_after(self, last_id: str | None, limit: int) -> list[Event]:
        after = 0 if last_id is None else self.sort_key(last_id)[0]
        stmt = (
            select(
                events_table.c.id,
                events_table.c.scan_id,
                events_table.c.type,
                events_table.c.at,
                events_table.c.payload,
            )
            .where(events_table.c.id > after)
            .order_by(events_table.c.id)
            .limit(limit)
        )
        with self.store._tx() as conn:
            rows = conn.execute(stmt).all()
        return [self._event(r) for r in rows]

    def wait_after(self, last_id: str | None, limit: int, timeout_s: float) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.read_after(last_id, limit)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            time.sleep(min(TABLE_POLL_EVERY_S, remaining))

    def last_id(self) -> str:
        from sqlalchemy import func

        with self.store._tx() as conn:
            newest = conn.execute(select(func.max(events_table.c.id))).scalar()
        return self.zero_id if newest is None else str(int(newest))

    def sort_key(self, event_id: str) -> tuple[int, ...]:
        if not event_id.isdigit():
            raise ValueError(f"not an event id: {event_id!r}")
        return (int(event_id),)

    def ping(self) -> None:
        self.store.ping()

    def _event(self, row: Any) -> Event:
        payload = row.payload
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except ValueError:
                payload = {}
        data: dict[str, Any] = dict(payload) if isinstance(payload, dict) else {}
        event_id = str(int(row.id))
        at = row.at.isoformat(timespec="microseconds") if row.at is not None else None
        data.update(id=event_id, type=row.type, scan_id=row.scan_id, at=at)
        return Event(event_id, data)


def _table_row(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Stored fields as a ``scanqueue_events`` row (the caller's mapping is not changed)."""
    payload = dict(fields)
    at = datetime.fromisoformat(payload.pop("at"))
    event_type = payload.pop("type")
    scan_id = payload.pop("scan_id")
    # Round-trip through JSON so any value the runner passed is storable.
    stored = json.loads(json.dumps(payload, default=str))
    return {"scan_id": scan_id, "type": event_type, "at": at, "payload": stored}


# -- choosing and caching ----------------------------------------------------------------


def stream_key(settings: Settings) -> str:
    return f"scanqueue:{settings.queue}:events"


def build_event_sink(settings: Settings, maxlen: int | None = None) -> EventSink:
    """A new sink for ``settings`` (Redis stream when REDIS_URL is set, else the table)."""
    retention = settings.events_maxlen if maxlen is None else maxlen
    if settings.redis_url:
        from scanqueue.db.redisconn import redis_client

        return RedisEventSink(
            redis_client(settings.redis_url), stream_key(settings), retention, settings.redis_url
        )
    from scanqueue.db.store import store_for

    return TableEventSink(store_for(settings.database_url), retention)


_sinks: dict[tuple[int, str | None, str, str], EventSink] = {}
_sinks_lock = threading.Lock()


def event_sink_for(settings: Settings) -> EventSink:
    """This process's sink for ``settings`` (rebuilt after a fork: prefork pools fork)."""
    key = (os.getpid(), settings.redis_url, settings.database_url, settings.queue)
    with _sinks_lock:
        found = _sinks.get(key)
        if found is None:
            for stale in [k for k in _sinks if k[0] != key[0]]:
                del _sinks[stale]
            found = _sinks[key] = build_event_sink(settings)
        return found


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

    :meth:`emit` never waits on the sink: it builds the stored fields (``at`` is
    the moment of the call, values are copied) and puts them on a bounded queue.
    The thread, started on the first event, waits ``linger_s`` after the first
    event of a batch, takes what is queued by then (up to ``max_batch``) and writes
    it with one :meth:`EventSink.write_batch`; a single thread and a FIFO queue
    keep each caller's events in the order they happened.

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
    ) -> None:
        self.sink = sink
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._down_until = 0.0
        self._full_warned_until = 0.0
        self._fresh()
        with _emitters_lock:
            _all_emitters.add(self)

    def _fresh(self) -> None:
        """An empty queue, no thread yet (at creation, and in a forked child)."""
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(self.max_queued)
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
        # Through JSON now, as stored: a runner that changes a list it reported after
        # reporting it must not change the event, and ``at`` is now.
        fields = json.loads(json.dumps(event_fields(event_type, scan_id, payload), default=str))
        if self._thread is None:
            self._start()
        with self._progress:
            try:
                self._queue.put_nowait(fields)
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

    def _send_forever(self, pending: queue.Queue[dict[str, Any]]) -> None:
        while True:
            batch = [pending.get()]
            if self.linger_s > 0:
                time.sleep(self.linger_s)
            # This thread is the only consumer: not empty means get_nowait succeeds.
            while len(batch) < self.max_batch and not pending.empty():
                batch.append(pending.get_nowait())
            try:
                self._write(batch)
            finally:
                with self._progress:
                    self._handled += len(batch)
                    self._progress.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if time.monotonic() < self._down_until:
            for _ in batch:
                _count_failure()
            return
        try:
            self.sink.write_batch(batch)
        except Exception as exc:
            self._down_until = time.monotonic() + FAILURE_BACKOFF_S
            for _ in batch:
                _count_failure()
            log.warning(
                "%d event(s) dropped, first %s for scan %s: %s unreachable (%s); "
                "dropping events for %gs",
                len(batch),
                batch[0].get("type"),
                batch[0].get("scan_id"),
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

    def finished(self, run: RunInfo, row: ScanRow, duration_s: float) -> None:
        payload: dict[str, Any] = {
            "attempt": run.attempt,
            "status": row.status,
            "findings_count": row.findings_count,
            "duration_s": round(duration_s, 6),
        }
        if row.status == STATUS_COMPLETED:
            event_type = "scan.completed"
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
