"""Retention (docs/reference.md#retention): which finished scans may go, and deleting them
in small batches.

Owns the statements behind ``SCANQUEUE_RETAIN_DAYS`` / ``SCANQUEUE_RETAIN_PER_KEY``
and ``scanqueue prune``; the pass that drives them (a cursor, pauses, the
leader's budget) is :mod:`scanqueue.dispatch.retention`.

A scan is a **candidate** when it is finished (completed, failed, canceled) and
finished before the cutoff (now − days; a finished row without ``finished_at``
counts by ``created_at``).  A candidate is **kept** when

* it is one of the last ``per_key`` completed scans of its key (by
  ``finished_at``), or
* it is the **baseline** of a scan that stays — a queued or running scan of
  its key, or a completed one that is not a candidate or is kept by the rule
  above: the baseline of a scan X is the latest completed scan of X's key that
  finished before X started (a queued scan that has not started yet will take
  the key's newest completed scan).  Failed and canceled scans are never
  baselines.  This is not transitive: a scan kept only as a baseline does not
  keep its own baseline.

Everything else goes, with its ``findings``, its ``scanqueue_events`` rows and
its webhook outbox rows.  Queued and running scans are never candidates.

Deletes run in batches of at most :data:`BATCH_SCANS` scans, each table's rows
in their own short transactions (SQLite has one writer at a time, so a long
delete would stall every insert into ``scans``); children go first, the scan
row last, so a pass cut off half-way leaves no orphans behind, only scans to
delete next time.  Candidates are read by (created_at, id) through
``scans_created_id_idx``; the keep rules use ``scans_key_completed_idx`` and
``scans_key_started_idx``.  Completed rows without ``effective_key`` (written
finished by another program, never seen by a bridge) get it filled in from
their providers and frameworks before anything is judged (not under
``--dry-run``, which reports such candidates apart).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, text, tuple_, update

from scanqueue.db.engine import StoreBase
from scanqueue.db.keys import effective_key
from scanqueue.db.rows import decode_json
from scanqueue.db.schema import (
    FINISHED_STATUSES,
    events,
    findings,
    scans,
    webhook_deliveries,
)

BATCH_SCANS = 500  # scans judged and deleted per batch
DELETE_CHUNK_SCANS = 50  # scans whose children one delete statement removes
# SQLite: smaller deletes, and the write lock left free for a moment after each, so
# an INSERT waiting in SQLite's busy handler (which sleeps 1, 2, 5, 10, … ms between
# tries) gets in (bench/prune.py measures the inserter's worst wait).
SQLITE_DELETE_CHUNK_SCANS = 25
SQLITE_PAUSE_S = 0.01
PG_PAUSE_S = 0.02  # PostgreSQL: between chunks (row deletes never block inserts there)
FAR_PAST = datetime(1970, 1, 1, tzinfo=UTC)
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass
class PruneCounts:
    """Rows removed (or, in a dry run, that would be)."""

    scans: int = 0
    findings: int = 0
    events: int = 0
    deliveries: int = 0
    kept: int = 0  # candidates kept by the per-key or baseline rule
    unkeyed: int = 0  # dry run: candidates without a key yet (judged on a real run)
    scan_ids: list[str] = field(default_factory=list)

    def add(self, other: PruneCounts) -> None:
        self.scans += other.scans
        self.findings += other.findings
        self.events += other.events
        self.deliveries += other.deliveries
        self.kept += other.kept
        self.unkeyed += other.unkeyed
        self.scan_ids.extend(other.scan_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "scans": self.scans,
            "findings": self.findings,
            "events": self.events,
            "deliveries": self.deliveries,
            "kept": self.kept,
            "unkeyed": self.unkeyed,
        }


@dataclass(frozen=True)
class Candidate:
    id: str
    status: str
    key: str | None
    created_at: datetime


Cursor = tuple[datetime, str] | None

# Which completed candidates stay.  :nth is per_key − 1 (the per-key rule is left
# out when per_key is 0).  Correlated subqueries only, so PostgreSQL and SQLite
# both run it as written.
_KEEP_SQL = """
SELECT c.id FROM scans c
WHERE c.id IN :ids AND c.status = 'completed' AND c.effective_key IS NOT NULL AND (
  {per_key_rule}
  EXISTS (
    SELECT 1 FROM scans x
    WHERE x.effective_key = c.effective_key
      AND x.status IN ('queued', 'running', 'completed')
      AND (
        (x.started_at > c.finished_at
         AND x.started_at <= COALESCE(
           (SELECT min(n.finished_at) FROM scans n
            WHERE n.effective_key = c.effective_key AND n.status = 'completed'
              AND n.finished_at > c.finished_at),
           :far_future)
         AND (x.status IN ('queued', 'running')
              OR x.finished_at >= :cutoff
              {x_per_key_rule}))
        OR (x.status = 'queued' AND x.started_at IS NULL
            AND NOT EXISTS (
              SELECT 1 FROM scans n2
              WHERE n2.effective_key = c.effective_key AND n2.status = 'completed'
                AND n2.finished_at > c.finished_at))
      )
  )
)
"""
_NTH_NEWEST = """COALESCE(
  (SELECT m.finished_at FROM scans m
   WHERE m.effective_key = {alias}.effective_key AND m.status = 'completed'
   ORDER BY m.finished_at DESC LIMIT 1 OFFSET :nth),
  :far_past)"""


def _keep_statement(per_key: int) -> Any:
    if per_key > 0:
        per_key_rule = f"c.finished_at >= {_NTH_NEWEST.format(alias='c')} OR"
        x_rule = f"OR (x.status = 'completed' AND x.finished_at >= {_NTH_NEWEST.format(alias='x')})"
    else:
        per_key_rule, x_rule = "", ""
    sql = _KEEP_SQL.format(per_key_rule=per_key_rule, x_per_key_rule=x_rule)
    return text(sql).bindparams(bindparam("ids", expanding=True))


class RetentionMixin(StoreBase):
    """Finding, judging and deleting old finished scans."""

    def retention_cutoff(self, days: float) -> datetime:
        """The database clock minus ``days``."""
        with self._tx(single=True) as conn:
            now = conn.execute(select(self._now)).scalar_one()
        assert isinstance(now, datetime)
        return now - timedelta(days=days)

    def prune_candidates(
        self, cutoff: datetime, after: Cursor, limit: int = BATCH_SCANS
    ) -> tuple[list[Candidate], Cursor]:
        """Up to ``limit`` finished scans older than ``cutoff``, after ``after`` in
        (created_at, id) order; and the cursor to go on from (None: no more)."""
        s = scans.c
        query = (
            select(s.id, s.status, s.effective_key, s.created_at)
            .where(
                s.created_at < cutoff,
                s.status.in_(FINISHED_STATUSES),
                or_(s.finished_at < cutoff, s.finished_at.is_(None)),
            )
            .order_by(s.created_at, s.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(tuple_(s.created_at, s.id) > tuple_(after[0], after[1]))
        with self._tx(single=True) as conn:
            rows = conn.execute(query).all()
        found = [Candidate(r.id, r.status, r.effective_key, r.created_at) for r in rows]
        cursor: Cursor = (found[-1].created_at, found[-1].id) if len(found) == limit else None
        return found, cursor

    def fill_missing_keys(self, after: Cursor, limit: int = BATCH_SCANS) -> Cursor:
        """Store the derived key of up to ``limit`` completed scans that have none, after
        ``after`` in (created_at, id) order; returns the cursor to go on from (None: done).

        Rows other programs wrote as finished were never seen by a bridge, so they
        have no ``effective_key``; the per-key and baseline rules need it on every
        completed scan of the key, old or recent, before any is judged.  The partial
        index ``scans_keyless_idx`` holds just these rows.  A row whose providers or
        frameworks are not JSON arrays keeps no key (and no per-key protection).
        """
        s = scans.c
        query = (
            select(s.id, s.created_at, s.scan_key, s.providers_scanned, s.frameworks_scanned)
            .where(s.status == "completed", s.effective_key.is_(None))
            .order_by(s.created_at, s.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(tuple_(s.created_at, s.id) > tuple_(after[0], after[1]))
        with self._tx(single=True) as conn:
            rows = conn.execute(query).all()
        keys: dict[str, str] = {}
        for r in rows:
            providers = decode_json(r.providers_scanned)
            frameworks = decode_json(r.frameworks_scanned)
            if isinstance(providers, list) and isinstance(frameworks, list):
                keys[r.id] = effective_key(
                    r.scan_key, [str(p) for p in providers], [str(f) for f in frameworks]
                )
        if keys:
            with self._tx() as conn:
                conn.execute(
                    update(scans)
                    .where(scans.c.id == bindparam("sid"), scans.c.effective_key.is_(None))
                    .values(effective_key=bindparam("key")),
                    [{"sid": sid, "key": key} for sid, key in keys.items()],
                )
        return (rows[-1].created_at, rows[-1].id) if len(rows) == limit else None

    def kept_candidates(
        self, candidates: Sequence[Candidate], cutoff: datetime, per_key: int
    ) -> set[str]:
        """The ids among ``candidates`` that the per-key or baseline rule keeps."""
        ids = [c.id for c in candidates if c.status == "completed" and c.key is not None]
        if not ids:
            return set()
        params: dict[str, Any] = {
            "ids": ids,
            "cutoff": cutoff,
            "far_future": FAR_FUTURE,
            "far_past": FAR_PAST,
        }
        if per_key > 0:
            params["nth"] = per_key - 1
        if self.dialect == "sqlite":
            # Times are text there: bind them in the stored format.
            for name in ("cutoff", "far_future", "far_past"):
                params[name] = params[name].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        with self._tx(single=True) as conn:
            return {r[0] for r in conn.execute(_keep_statement(per_key), params).all()}

    def count_children(self, scan_ids: Sequence[str]) -> PruneCounts:
        """What deleting ``scan_ids`` would remove besides the scans (for a dry run)."""
        counts = PruneCounts(scans=len(scan_ids), scan_ids=list(scan_ids))
        for start in range(0, len(scan_ids), DELETE_CHUNK_SCANS):
            chunk = list(scan_ids[start : start + DELETE_CHUNK_SCANS])
            with self._tx(single=True) as conn:
                counts.findings += conn.execute(
                    select(func.count()).where(findings.c.scan_id.in_(chunk))
                ).scalar_one()
                counts.events += conn.execute(
                    select(func.count()).where(events.c.scan_id.in_(chunk))
                ).scalar_one()
                counts.deliveries += conn.execute(
                    select(func.count()).where(webhook_deliveries.c.scan_id.in_(chunk))
                ).scalar_one()
        return counts

    def delete_scans(self, scan_ids: Sequence[str]) -> PruneCounts:
        """Delete finished scans with their findings, events and outbox rows.

        Chunk by chunk (:data:`DELETE_CHUNK_SCANS` scans; :data:`SQLITE_DELETE_CHUNK_SCANS`
        on SQLite), each table's rows in their own statement and transaction:
        children first, then the scan rows (only if still finished).  On SQLite,
        whose one writer at a time makes every other writer wait (and back off),
        each delete is followed by :data:`SQLITE_PAUSE_S` with the lock free and
        the WAL is checkpointed by the pruner, not by the next insert's commit.
        """
        sqlite = self.dialect == "sqlite"
        size = SQLITE_DELETE_CHUNK_SCANS if sqlite else DELETE_CHUNK_SCANS
        counts = PruneCounts()
        for start in range(0, len(scan_ids), size):
            chunk = list(scan_ids[start : start + size])
            for table, counter in (
                (findings, "findings"),
                (events, "events"),
                (webhook_deliveries, "deliveries"),
            ):
                with self._tx(single=True) as conn:
                    removed = conn.execute(delete(table).where(table.c.scan_id.in_(chunk)))
                setattr(counts, counter, getattr(counts, counter) + removed.rowcount)
                self._yield_writer(sqlite)
            with self._tx(single=True) as conn:
                gone = conn.execute(
                    delete(scans)
                    .where(scans.c.id.in_(chunk), scans.c.status.in_(FINISHED_STATUSES))
                    .returning(scans.c.id)
                ).all()
            self._yield_writer(sqlite, checkpoint=True)
            counts.scans += len(gone)
            counts.scan_ids.extend(r[0] for r in gone)
        return counts

    def _yield_writer(self, sqlite: bool, checkpoint: bool = False) -> None:
        if not sqlite:
            if checkpoint:  # after each chunk: the host's writes get the disk and CPU
                time.sleep(PG_PAUSE_S)
            return
        if checkpoint:
            with self._tx(single=True) as conn:
                conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))
        time.sleep(SQLITE_PAUSE_S)
