"""Scan events (docs/reference.md, Events): what an event is and the log it goes to.

This module owns the vocabulary every other events module shares: the
:class:`Event` a reader gets back, the :class:`EventSink` protocol (an ordered,
capped, resumable log), the event types, and :func:`event_fields`, the stored
form of an event.  An event is a JSON object with ``id``, ``type``,
``scan_id``, ``at`` (ISO-8601 UTC) and its payload fields; ids only grow, so a
reader resumes after the last id it saw (``read_after``) — that is what
``GET /api/v1/events`` and its ``Last-Event-ID`` resume are built on.  The
token never reaches an event (:data:`SECRET_KEYS`).

The rest of the events rooms build on this one, one way:

- :mod:`scanqueue.observe.event_sinks` — where events are written: a capped
  Redis stream with ``REDIS_URL``, else the ``scanqueue_events`` table; and
  choosing and caching this process's sink (``event_sink_for``).
- :mod:`scanqueue.observe.event_sender` — writing without failing or slowing a
  scan: the background sender, flushing at exit and after a fork, the
  :class:`EventObserver` a run reports through, and ``emit_standalone`` for the
  CLI and API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

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
    # A queued row a bridge saw for the first time (whoever inserted it): ``key``.
    "scan.queued",
    # Scan policies (docs/reference.md#policies): a failed run put back for a retry (delay_s, error,
    # retries, run_after), and a run that ran past its timeout (timeout_s).
    "scan.retrying",
    "scan.timed_out",
    # Schedules (docs/reference.md#schedules): ``scan_id`` is the fired scan, or "" when none was
    # made.
    "schedule.fired",
    "schedule.skipped",
)


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

    def write_encoded(self, bodies: Sequence[str]) -> list[str]:
        """:meth:`write_batch` of events already encoded (:func:`encode_event`)."""
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


def encode_event(event_type: str, scan_id: str, payload: Mapping[str, Any]) -> str:
    """:func:`event_fields` as the JSON text a sink stores (a value JSON cannot hold is
    stored as its ``str``): fixed when the event happens, so a runner that changes a
    list after reporting it does not change the event."""
    return json.dumps(event_fields(event_type, scan_id, payload), default=str)
