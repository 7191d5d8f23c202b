"""Producers and users: the statements behind enqueue, get, list, cancel and counts.

Owns what the API, the CLI and ``scanqueue.enqueue`` ask of ``scans`` directly:
inserting a scan (with its policies and its ``effective_key``; ``unique``
returns the key's queued scan instead, serialized per key so concurrent
enqueues leave one row), reading one or a page of them (newest first, filtered
by status, key and labels), the ``queued|running → canceled`` compare-and-set,
counts by status (unknown statuses included, so they are reported rather than
stranded), the queue depth (cached briefly per process) and the oldest queued
scan's age.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime

from sqlalchemy import Connection, Text, and_, cast, func, insert, or_, select, text, update
from sqlalchemy.sql.elements import ColumnElement

from scanqueue.db.engine import StoreBase
from scanqueue.db.rows import PUBLIC_COLUMNS, ScanRow, new_scan_id
from scanqueue.db.scan_request import ScanRequest
from scanqueue.db.schema import (
    STATUS_CANCELED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    STATUSES,
    scans,
)
from scanqueue.errors import ConflictError, NotFoundError

# pg_advisory_xact_lock(class, hashtext(key)): the two-int key space, apart from the
# dispatch lock's single bigint, serializes unique enqueues of one key.
UNIQUE_LOCK_CLASS = 0x5CA9


class ScansMixin(StoreBase):
    """The scans as producers and users see them."""

    # A count of queued rows and when it was made (see :meth:`queue_depth`).
    _depth_cache: tuple[float, int] | None = None

    def enqueue(
        self,
        providers: Sequence[str],
        frameworks: Sequence[str],
        user: str | None = None,
        token: str | None = None,
        scan_id: str | None = None,
    ) -> ScanRow:
        """Insert a queued scan with no policies of its own (see :meth:`enqueue_request`)."""
        request = ScanRequest(list(providers), list(frameworks), user)
        return self.enqueue_request(request, token=token, scan_id=scan_id)[0]

    def enqueue_request(
        self, request: ScanRequest, token: str | None = None, scan_id: str | None = None
    ) -> tuple[ScanRow, bool]:
        """Insert a validated request; returns (the scan, whether it was deduplicated).

        With ``request.unique``, the oldest ``queued`` scan of the same key is
        returned instead of inserting, under a lock per key (PostgreSQL: an advisory
        transaction lock on the key's hash; SQLite: ``BEGIN IMMEDIATE``), so
        concurrent unique enqueues of one key leave one queued row.
        """
        key = request.effective_key
        values = {
            "id": scan_id or new_scan_id(),
            "status": STATUS_QUEUED,
            "providers_scanned": list(request.providers),
            "frameworks_scanned": list(request.frameworks),
            "triggered_by_user": request.user,
            "triggered_by_token": token,
            "priority": request.priority,
            "run_after": request.run_after,
            "scan_key": request.key,
            "effective_key": key,
            "timeout_seconds": request.timeout_seconds,
            "labels": dict(request.labels) if request.labels else None,
        }
        if not request.unique:
            with self._tx(single=True) as conn:
                row = conn.execute(insert(scans).values(**values).returning(*PUBLIC_COLUMNS)).one()
            return ScanRow.from_row(row), False
        with self._key_locked_tx(key) as conn:
            found = conn.execute(
                select(*PUBLIC_COLUMNS)
                .where(scans.c.effective_key == key, scans.c.status == STATUS_QUEUED)
                .order_by(scans.c.created_at, scans.c.id)
                .limit(1)
            ).first()
            if found is not None:
                return ScanRow.from_row(found), True
            row = conn.execute(insert(scans).values(**values).returning(*PUBLIC_COLUMNS)).one()
        return ScanRow.from_row(row), False

    def _key_locked_tx(self, key: str) -> AbstractContextManager[Connection]:
        """A transaction that holds ``key``'s unique-enqueue lock from its first statement."""
        return self._locked_tx(
            "SELECT pg_advisory_xact_lock(:c, hashtext(:k))", {"c": UNIQUE_LOCK_CLASS, "k": key}
        )

    def get(self, scan_id: str) -> ScanRow:
        with self._tx(single=True) as conn:
            row = conn.execute(select(*PUBLIC_COLUMNS).where(scans.c.id == scan_id)).first()
        if row is None:
            raise NotFoundError(f"no scan with id {scan_id!r}")
        return ScanRow.from_row(row)

    def list_scans(
        self,
        status: str | None = None,
        limit: int = 1000,
        offset: int = 0,
        *,
        key: str | None = None,
        labels: Mapping[str, str] | None = None,
        search: str | None = None,
    ) -> list[ScanRow]:
        """The newest ``limit`` scans (after ``offset``), newest first.

        Filtered by ``status``, by effective ``key``, by ``labels`` (every
        given label must match: AND) and by ``search``: text found, ignoring
        case, in the id, user, error, key or providers (the console's text filter).
        """
        stmt = select(*PUBLIC_COLUMNS)
        if status is not None:
            stmt = stmt.where(scans.c.status == status)
        if key is not None:
            stmt = stmt.where(scans.c.effective_key == key)
        if search:
            needle = search.lower()
            stmt = stmt.where(
                or_(
                    *(
                        func.lower(func.coalesce(column, "")).contains(needle, autoescape=True)
                        for column in (
                            scans.c.id,
                            scans.c.triggered_by_user,
                            scans.c.error,
                            scans.c.effective_key,
                            cast(scans.c.providers_scanned, Text),
                        )
                    )
                )
            )
        if labels:
            stmt = stmt.where(and_(*self._label_matches(labels)))
        stmt = (
            stmt.order_by(scans.c.created_at.desc(), scans.c.id.desc()).limit(limit).offset(offset)
        )
        with self._tx(single=True) as conn:
            rows = conn.execute(stmt).all()
        return [ScanRow.from_row(r) for r in rows]

    def _label_matches(self, labels: Mapping[str, str]) -> list[ColumnElement[bool]]:
        """One condition per label; keys are validated (LABEL_KEY_PATTERN), values bound."""
        conditions: list[ColumnElement[bool]] = []
        for i, (k, v) in enumerate(sorted(labels.items())):
            if self.dialect == "postgresql":
                clause = text(f"(scans.labels ->> :lk{i}) = :lv{i}")
                conditions.append(clause.bindparams(**{f"lk{i}": k, f"lv{i}": v}))  # type: ignore[arg-type]
            else:
                clause = text(f"json_extract(scans.labels, :lk{i}) = :lv{i}")
                conditions.append(
                    clause.bindparams(**{f"lk{i}": f'$."{k}"', f"lv{i}": v})  # type: ignore[arg-type]
                )
        return conditions

    def cancel(self, scan_id: str, reason: str = "canceled by request") -> ScanRow:
        """queued|running → canceled; NotFoundError or ConflictError otherwise."""
        with self._tx(single=True) as conn:
            row = conn.execute(
                update(scans)
                .where(scans.c.id == scan_id, scans.c.status.in_((STATUS_QUEUED, STATUS_RUNNING)))
                .values(status=STATUS_CANCELED, finished_at=self._now, error=reason)
                .returning(*PUBLIC_COLUMNS)
            ).first()
        if row is not None:
            return ScanRow.from_row(row)
        current = self.get(scan_id)  # raises NotFoundError
        raise ConflictError(f"scan {scan_id} is already {current.status}")

    def count_by_status(self) -> dict[str, int]:
        """Rows per stored ``status`` value, unknown values (``QUEUED``, ``''``) included."""
        with self._tx(single=True) as conn:
            rows = conn.execute(select(scans.c.status, func.count()).group_by(scans.c.status)).all()
        return {str(status): int(n) for status, n in rows}

    def rows_with_unknown_status(self, limit: int = 100) -> list[tuple[str, str]]:
        """``(id, status)`` of up to ``limit`` rows whose status scanqueue does not know.

        Another program may write ``QUEUED`` or ``pending``: no part of scanqueue
        picks such a row up, so it is reported instead of silently stranded.
        """
        with self._tx(single=True) as conn:
            rows = conn.execute(
                select(scans.c.id, scans.c.status)
                .where(scans.c.status.not_in(STATUSES))
                .order_by(scans.c.id)
                .limit(limit)
            ).all()
        return [(str(r.id), str(r.status)) for r in rows]

    def oldest_queued_age_s(self) -> float:
        """Seconds since the oldest ``queued`` scan was created (0 when none is)."""
        with self._tx(single=True) as conn:
            oldest = conn.execute(
                select(func.min(scans.c.created_at)).where(scans.c.status == STATUS_QUEUED)
            ).scalar_one()
        if oldest is None:
            return 0.0
        if isinstance(oldest, str):  # SQLite's min() over text loses the column type
            oldest = datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return max(0.0, float((datetime.now(UTC) - oldest).total_seconds()))

    def queue_depth(self, max_age_s: float = 0.0) -> int:
        """Rows with status ``queued``.

        ``max_age_s`` > 0 accepts a count made that recently by this process: the
        bridge's maintenance tick, the autoscaler's sampler and ``/metrics``
        scrapes then share one count per interval instead of each running its own.
        """
        if max_age_s > 0:
            cached = self._depth_cache
            if cached is not None and time.monotonic() - cached[0] < max_age_s:
                return cached[1]
        with self._tx(single=True) as conn:
            depth = int(
                conn.execute(
                    select(func.count()).select_from(scans).where(scans.c.status == STATUS_QUEUED)
                ).scalar_one()
            )
        self._depth_cache = (time.monotonic(), depth)
        return depth
