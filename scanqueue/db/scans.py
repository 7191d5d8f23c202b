"""Producers and users: the statements behind enqueue, get, list, cancel and counts.

Owns what the API and the CLI ask of ``scans`` directly: inserting a scan,
reading one or a page of them, the ``queued|running → canceled`` compare-and-
set, counts by status (unknown statuses included, so they are reported rather
than stranded) and the queue depth, cached briefly per process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import func, insert, select, update

from scanqueue.db.engine import StoreBase
from scanqueue.db.rows import PUBLIC_COLUMNS, ScanRow, new_scan_id
from scanqueue.db.schema import (
    STATUS_CANCELED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    STATUSES,
    scans,
)
from scanqueue.errors import ConflictError, NotFoundError


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
        scan_id = scan_id or new_scan_id()
        with self._tx(single=True) as conn:
            row = conn.execute(
                insert(scans)
                .values(
                    id=scan_id,
                    status=STATUS_QUEUED,
                    providers_scanned=list(providers),
                    frameworks_scanned=list(frameworks),
                    triggered_by_user=user,
                    triggered_by_token=token,
                )
                .returning(*PUBLIC_COLUMNS)
            ).one()
        return ScanRow.from_row(row)

    def get(self, scan_id: str) -> ScanRow:
        with self._tx(single=True) as conn:
            row = conn.execute(select(*PUBLIC_COLUMNS).where(scans.c.id == scan_id)).first()
        if row is None:
            raise NotFoundError(f"no scan with id {scan_id!r}")
        return ScanRow.from_row(row)

    def list_scans(
        self, status: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[ScanRow]:
        """The newest ``limit`` scans (after ``offset``), returned oldest first."""
        stmt = select(*PUBLIC_COLUMNS)
        if status is not None:
            stmt = stmt.where(scans.c.status == status)
        stmt = (
            stmt.order_by(scans.c.created_at.desc(), scans.c.id.desc()).limit(limit).offset(offset)
        )
        with self._tx(single=True) as conn:
            rows = conn.execute(stmt).all()
        return [ScanRow.from_row(r) for r in reversed(rows)]

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
