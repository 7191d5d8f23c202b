"""Where scan events are written: a capped Redis stream, or the events table.

This module owns the two :class:`~scanqueue.observe.events.EventSink`
implementations and the choice between them.  With ``REDIS_URL`` the log is a
capped Redis stream (``scanqueue:{queue}:events``, ``XADD MAXLEN ~ N``);
without it, the ``scanqueue_events`` table, pruned to about the same
retention.  :func:`build_event_sink` makes a sink for a configuration;
:func:`event_sink_for` keeps one per process (rebuilt after a fork).

A sink raises when it cannot write; not failing a scan over that is the
sender's job (:mod:`scanqueue.observe.event_sender`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, text

from scanqueue.config import Settings, mask_url
from scanqueue.db.schema import events as events_table
from scanqueue.observe.events import Event, EventSink, encode_event, event_fields

if TYPE_CHECKING:
    import redis

    from scanqueue.db.store import Store

TABLE_POLL_EVERY_S = 0.2
PG_LOCK_TIMEOUT_MS = 2000


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
        return self._xadd(encode_event(event_type, scan_id, payload))

    def write_batch(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        return self.write_encoded([json.dumps(fields, default=str) for fields in items])

    def write_encoded(self, bodies: Sequence[str]) -> list[str]:
        if len(bodies) <= 1:
            # The usual case when events trickle in; a pipeline costs more for one.
            return [self._xadd(body) for body in bodies]
        # One round trip; no MULTI, since each XADD stands on its own.
        pipe = self.client.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(self.key, {"e": body}, maxlen=self.maxlen, approximate=True)
        return [_text(new_id) for new_id in pipe.execute()]

    def _xadd(self, body: str) -> str:
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
        return self.write_encoded([json.dumps(fields, default=str) for fields in items])

    def write_encoded(self, bodies: Sequence[str]) -> list[str]:
        if not bodies:
            return []
        rows = [_table_row(json.loads(body)) for body in bodies]
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


def _table_row(fields: dict[str, Any]) -> dict[str, Any]:
    """Decoded stored fields (:func:`encode_event`'s JSON, so every value is storable)
    as a ``scanqueue_events`` row; takes ``fields`` apart."""
    at = datetime.fromisoformat(fields.pop("at"))
    event_type = fields.pop("type")
    scan_id = fields.pop("scan_id")
    return {"scan_id": scan_id, "type": event_type, "at": at, "payload": fields}


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
