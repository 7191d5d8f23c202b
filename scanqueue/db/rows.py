"""The shapes rows take once they leave the database: frozen records and their helpers.

Owns :data:`PUBLIC_COLUMNS` (what users may see of a scan: never the token),
:class:`ScanRow`, :class:`StartedRun`, :class:`FinishedRun`, :class:`ReapedScan`, and the small
conversions every reader of ``scans`` needs (:func:`iso`, :func:`decode_json`,
:func:`new_scan_id`).  No statements run here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from scanqueue.db.schema import scans

# The columns other programs and users may see: never the token.
PUBLIC_COLUMNS = (
    scans.c.id,
    scans.c.status,
    scans.c.providers_scanned,
    scans.c.frameworks_scanned,
    scans.c.triggered_by_user,
    scans.c.created_at,
    scans.c.started_at,
    scans.c.finished_at,
    scans.c.error,
    scans.c.findings_count,
    scans.c.attempts,
    scans.c.findings_new,
    scans.c.findings_fixed,
    scans.c.baseline_id,
    # Scan policies (docs/reference.md#policies); ``effective_key`` is shown as ``key``.
    scans.c.priority,
    scans.c.run_after,
    scans.c.scan_key,
    scans.c.effective_key,
    scans.c.timeout_seconds,
    scans.c.retries,
    scans.c.labels,
    # Schedules (docs/reference.md#schedules): which schedule and fire time made it.
    scans.c.schedule_name,
    scans.c.scheduled_for,
)


# What a run's finish returns: what its observers report (events, metrics, lineage).
FINISH_COLUMNS = (
    scans.c.status,
    scans.c.finished_at,
    scans.c.error,
    scans.c.findings_count,
    scans.c.findings_new,
    scans.c.findings_fixed,
)


@dataclass(frozen=True)
class FinishedRun:
    """A run's finish as written (:data:`FINISH_COLUMNS`).  Not the whole row: each
    column a statement returns costs the pool process decoding, and a run's finish
    is on every scan's path."""

    status: str
    finished_at: datetime | None
    error: str | None
    findings_count: int
    # NULL until the diff is computed (docs/reference.md#findings-over-time).
    findings_new: int | None = None
    findings_fixed: int | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[Any, Any]) -> FinishedRun:
        return cls(
            status=m["status"],
            finished_at=m["finished_at"],
            error=m["error"],
            findings_count=m["findings_count"] or 0,
            findings_new=m["findings_new"],
            findings_fixed=m["findings_fixed"],
        )


@dataclass(frozen=True)
class ScanRow:
    """A scan as users see it (docs/reference.md#commands): the contract columns, never the
    token."""

    id: str
    status: str
    providers_scanned: Any
    frameworks_scanned: Any
    triggered_by_user: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    findings_count: int
    attempts: int
    # Findings over time (docs/reference.md#findings-over-time): NULL until the diff is computed.
    findings_new: int | None = None
    findings_fixed: int | None = None
    baseline_id: str | None = None
    # Scan policies (docs/reference.md#policies): ``key`` is the effective key (``scan_key`` when
    # set, else derived from providers and frameworks; None until a bridge saw it).
    priority: int = 0
    run_after: datetime | None = None
    scan_key: str | None = None
    key: str | None = None
    timeout_seconds: int | None = None
    retries: int = 0
    labels: Any = None
    schedule_name: str | None = None
    scheduled_for: datetime | None = None

    @classmethod
    def from_row(cls, row: Row[Any] | Any) -> ScanRow:
        return cls.from_mapping(row._mapping)

    @classmethod
    def from_mapping(cls, m: Mapping[Any, Any]) -> ScanRow:
        return cls(
            id=m["id"],
            status=m["status"],
            providers_scanned=decode_json(m["providers_scanned"]),
            frameworks_scanned=decode_json(m["frameworks_scanned"]),
            triggered_by_user=m["triggered_by_user"],
            created_at=m["created_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            error=m["error"],
            findings_count=m["findings_count"] or 0,
            attempts=m["attempts"] or 0,
            findings_new=m.get("findings_new"),
            findings_fixed=m.get("findings_fixed"),
            baseline_id=m.get("baseline_id"),
            priority=m.get("priority") or 0,
            run_after=m.get("run_after"),
            scan_key=m.get("scan_key"),
            key=m.get("effective_key"),
            timeout_seconds=m.get("timeout_seconds"),
            retries=m.get("retries") or 0,
            labels=decode_json(m.get("labels")),
            schedule_name=m.get("schedule_name"),
            scheduled_for=m.get("scheduled_for"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "providers_scanned": self.providers_scanned,
            "frameworks_scanned": self.frameworks_scanned,
            "triggered_by_user": self.triggered_by_user,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "error": self.error,
            "findings_count": self.findings_count,
            "attempts": self.attempts,
            "findings_new": self.findings_new,
            "findings_fixed": self.findings_fixed,
            "baseline_id": self.baseline_id,
            "priority": self.priority,
            "run_after": iso(self.run_after),
            "scan_key": self.scan_key,
            "key": self.key,
            "timeout_seconds": self.timeout_seconds,
            "retries": self.retries,
            "labels": self.labels,
            "schedule_name": self.schedule_name,
            "scheduled_for": iso(self.scheduled_for),
        }


@dataclass(frozen=True)
class StartedRun:
    """What a worker gets when its compare-and-set ``queued → running`` wins."""

    scan_id: str
    attempt: int
    providers_raw: Any
    frameworks_raw: Any
    triggered_by_user: str | None
    triggered_by_token: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    # Scan policies (docs/reference.md#policies): the row's own timeout (None:
    # SCANQUEUE_SCAN_TIMEOUT)
    # and the runner failures retried so far.
    timeout_seconds: int | None = None
    retries: int = 0
    # The scan this start claimed to take its place in the dispatch window, if any
    # (RunsMixin.start_run with a SuccessorWindow): its message is the caller's to send.
    successor_id: str | None = None

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"StartedRun(scan_id={self.scan_id!r}, attempt={self.attempt})"


@dataclass(frozen=True)
class SuccessorWindow:
    """The dispatch window as a start that claims its successor judges it.

    ``fixed`` is ``SCANQUEUE_DISPATCH_WINDOW`` (0: ``per_slot`` times the slots of the
    workers whose heartbeat is under ``stale_after_s`` old, at least ``minimum``).
    """

    fixed: int
    minimum: int
    per_slot: int
    stale_after_s: float


@dataclass(frozen=True)
class ReapedScan:
    scan_id: str
    attempt: int
    requeued: bool


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def decode_json(value: Any) -> Any:
    """A stored JSON column as Python: SQLite hands back text, PostgreSQL parsed jsonb.

    Text that is not JSON is returned as it is, so a listing never fails on one
    malformed row (running that scan reports it instead).
    """
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def new_scan_id() -> str:
    return uuid.uuid4().hex
