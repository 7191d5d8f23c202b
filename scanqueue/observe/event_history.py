"""A scan's own events, oldest first, read back from the durable event log.

The console's timeline (``GET /api/v1/scans/{id}/events``) reads here.  On the
events table that is an indexed lookup by ``scan_id``; on the Redis stream,
whose entries are not indexed by scan, it walks the stream forward from a
minute before the scan was created (stream ids are millisecond times), a page
at a time, and stops after :data:`MAX_SCANNED` entries — so one page view never
reads more than a bounded slice of a busy stream.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from scanqueue.db.schema import events as events_table
from scanqueue.observe.event_sinks import RedisEventSink, TableEventSink
from scanqueue.observe.events import Event, EventSink

DEFAULT_LIMIT = 500  # events of one scan returned at most
PAGE = 1000  # stream entries read per round trip
MAX_SCANNED = 200_000  # stream entries looked at per request, at most
CLOCK_SLACK_MS = 60_000  # start this long before the scan's created_at


def events_of_scan(
    sink: EventSink, scan_id: str, since: datetime | None = None, limit: int = DEFAULT_LIMIT
) -> list[Event]:
    """The first ``limit`` retained events whose ``scan_id`` is ``scan_id``, oldest first."""
    if isinstance(sink, TableEventSink):
        return _from_table(sink, scan_id, limit)
    if isinstance(sink, RedisEventSink):
        return _from_stream(sink, scan_id, since, limit)
    # Any other sink: walk it from the start, bounded the same way.
    found: list[Event] = []
    cursor: str | None = None
    scanned = 0
    while scanned < MAX_SCANNED and len(found) < limit:
        batch = sink.read_after(cursor, PAGE)
        if not batch:
            break
        scanned += len(batch)
        cursor = batch[-1].id
        found.extend(e for e in batch if e.scan_id == scan_id)
    return found[:limit]


def _from_table(sink: TableEventSink, scan_id: str, limit: int) -> list[Event]:
    t = events_table
    stmt = (
        select(t.c.id, t.c.scan_id, t.c.type, t.c.at, t.c.payload)
        .where(t.c.scan_id == scan_id)
        .order_by(t.c.id)
        .limit(limit)
    )
    with sink.store._tx() as conn:
        rows = conn.execute(stmt).all()
    return [sink._event(r) for r in rows]


def _from_stream(
    sink: RedisEventSink, scan_id: str, since: datetime | None, limit: int
) -> list[Event]:
    start = "-"
    if since is not None:
        start = f"{max(0, int(since.timestamp() * 1000) - CLOCK_SLACK_MS)}-0"
    found: list[Event] = []
    scanned = 0
    while scanned < MAX_SCANNED and len(found) < limit:
        entries: Any = sink.client.xrange(sink.key, start, "+", count=PAGE)
        if not entries:
            break
        scanned += len(entries)
        for raw_id, fields in entries:
            event = sink._event(raw_id, fields)
            if event.scan_id == scan_id:
                found.append(event)
        raw_last = entries[-1][0]
        start = f"({raw_last.decode() if isinstance(raw_last, bytes) else raw_last}"
        if len(entries) < PAGE:
            break
    return found[:limit]
