"""Reads for the console: recent activity per minute, and the worker a scan ran on.

Owns the statements behind ``GET /api/v1/activity`` (scans finished, failed
and canceled per minute over a recent window, and pickup latency — created to
started — per minute) and the worker half of a scan's page.  Each read is
bounded: at most :data:`MAX_ROWS` rows of the window are looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select

from scanqueue.db.rows import iso
from scanqueue.db.schema import scans as scans_table
from scanqueue.db.schema import workers
from scanqueue.db.store import Store

MAX_ROWS = 50_000  # rows of the window read at most per request
FINISHED = ("completed", "failed", "canceled")


@dataclass
class Minute:
    """One minute of the chart."""

    at: datetime
    completed: int = 0
    failed: int = 0
    canceled: int = 0
    started: int = 0
    pickup_total_s: float = 0.0
    pickup_max_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        mean = round(self.pickup_total_s / self.started, 3) if self.started else None
        return {
            "at": iso(self.at),
            "completed": self.completed,
            "failed": self.failed,
            "canceled": self.canceled,
            "started": self.started,
            "pickup_mean_s": mean,
            "pickup_max_s": None if self.pickup_max_s is None else round(self.pickup_max_s, 3),
        }


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def activity(store: Store, minutes: int, now: datetime | None = None) -> list[Minute]:
    """``minutes`` one-minute buckets ending with the current one, oldest first."""
    now = now or datetime.now(UTC)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    buckets = [Minute(start + timedelta(minutes=i)) for i in range(minutes)]
    s = scans_table
    stmt = (
        select(s.c.status, s.c.created_at, s.c.started_at, s.c.finished_at)
        .where(or_(s.c.finished_at >= start, s.c.started_at >= start))
        .limit(MAX_ROWS)
    )
    with store._tx(single=True) as conn:
        rows = conn.execute(stmt).all()

    def bucket(at: datetime | None) -> Minute | None:
        at = _aware(at)
        if at is None or not start <= at < end:
            return None
        return buckets[int((at - start).total_seconds() // 60)]

    for status, created_at, started_at, finished_at in rows:
        done = bucket(finished_at)
        if done is not None and status in FINISHED:
            setattr(done, status, getattr(done, status) + 1)
        began = bucket(started_at)
        created = _aware(created_at)
        if began is not None and created is not None:
            wait_s = max(0.0, (_aware(started_at) - created).total_seconds())  # type: ignore[operator]
            began.started += 1
            began.pickup_total_s += wait_s
            began.pickup_max_s = max(began.pickup_max_s or 0.0, wait_s)
    return buckets


def worker_of(store: Store, scan_id: str) -> dict[str, Any] | None:
    """The worker that holds or last held ``scan_id`` (id, host, pid, heartbeat), if known."""
    s, w = scans_table, workers
    with store._tx(single=True) as conn:
        worker_id = conn.execute(select(s.c.worker_id).where(s.c.id == scan_id)).scalar()
        if not worker_id:
            return None
        row = conn.execute(
            select(w.c.hostname, w.c.pid, w.c.slots, w.c.heartbeat_at).where(w.c.id == worker_id)
        ).first()
    found: dict[str, Any] = {"id": worker_id}
    if row is not None:
        found.update(
            hostname=row.hostname,
            pid=row.pid,
            slots=row.slots,
            heartbeat_at=iso(_aware(row.heartbeat_at)),
        )
    return found
