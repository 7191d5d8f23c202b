"""Scan policies' own state: per-key limits, pauses, keys' activity and intake.

Owns ``scanqueue_limits`` (``scanqueue limits set|list|clear``), ``scanqueue_pauses``
(``scanqueue pause|resume [KEY]``; :data:`~scanqueue.db.schema.PAUSE_ALL` stands
for the whole queue), what ``scanqueue queue`` shows per key (running and in
flight, with the limit that applies), and **intake**: queued rows no bridge has
seen yet (``seen_at IS NULL``, whoever inserted them) get their
``effective_key`` and ``seen_at`` — or, when their stored data is malformed, are
failed at once with the reason — in one SELECT and one batched UPDATE (on
PostgreSQL the well-formed rows first, in one prepared statement that derives
their key in SQL).

The claim that enforces all this lives in :mod:`scanqueue.db.claims`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, select, text, true, update

from scanqueue.db.claim_sql import pg_key, pg_sql_keyable
from scanqueue.db.direct_sql import DirectStatement, PreparedForm
from scanqueue.db.engine import StoreBase
from scanqueue.db.schema import (
    PAUSE_ALL,
    SQLITE_TIME_FORMAT,
    STATUS_FAILED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    key_limits,
    pauses,
    scans,
)
from scanqueue.errors import NotFoundError

INTAKE_BATCH = 500  # unseen rows taken in at once (the rest on the next pass)


# PostgreSQL's intake in one statement (the bridge's held connection, prepared): the
# unseen rows whose key SQL derives exactly as scanqueue.db.keys.effective_key does
# from the Runner API's parsing are keyed and marked seen ('taken', with the key);
# the rest ('left': a malformed column, or a scan_key with whitespace or a non-ASCII
# character at either end, whose stripping is Python's) stay unseen for take_in,
# which fails the malformed ones with the reason.  Its own transaction: a claim
# after it sees the keys, and rows another claim took meanwhile are harmless (the
# intake keys queued rows, dispatched or not).
PG_INTAKE_SQL = f"""
WITH cand AS MATERIALIZED (
    SELECT id, scan_key, providers_scanned AS p, frameworks_scanned AS f FROM scans
    WHERE status = 'queued' AND seen_at IS NULL
    ORDER BY created_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED),
keyed AS MATERIALIZED (
    SELECT id, {pg_key("scan_key", "p", "f")} AS key
    FROM cand
    WHERE {pg_sql_keyable("scan_key", "p", "f")}),
marked AS (
    UPDATE scans SET effective_key = keyed.key, seen_at = clock_timestamp()
    FROM keyed WHERE scans.id = keyed.id AND scans.seen_at IS NULL
    RETURNING scans.id, scans.effective_key)
SELECT 'taken' AS what, id, effective_key AS key FROM marked
UNION ALL
SELECT 'left', id, NULL FROM cand WHERE id NOT IN (SELECT id FROM keyed)
"""
MAX_LIMIT = 100_000  # a per-key limit, at most

# (scan_key, providers_raw, frameworks_raw) → the effective key; raises with the
# reason for a malformed row (the bridge passes the Runner API's parsing).
DeriveKey = Callable[[str | None, Any, Any], str]


@dataclass(frozen=True)
class Intake:
    """A row first seen: its key, or why it was failed (``error``)."""

    scan_id: str
    key: str | None
    error: str | None = None


def limits_in(conn: Connection) -> dict[str, int]:
    return {
        str(k): int(n) for k, n in conn.execute(select(key_limits.c.key, key_limits.c.max_running))
    }


def paused_in(conn: Connection) -> set[str]:
    return {str(k) for (k,) in conn.execute(select(pauses.c.key))}


class PoliciesMixin(StoreBase):
    """Limits, pauses, per-key activity and intake."""

    _direct_intake: DirectStatement | None = None

    # -- limits -------------------------------------------------------------------

    def set_limit(self, key: str, max_running: int) -> None:
        """Override the per-key limit for ``key`` (0 = unlimited for it)."""
        with self._tx() as conn:
            conn.execute(delete(key_limits).where(key_limits.c.key == key))
            conn.execute(key_limits.insert().values(key=key, max_running=max_running))

    def clear_limit(self, key: str) -> None:
        """Drop ``key``'s override (the default applies again); NotFoundError if none."""
        with self._tx(single=True) as conn:
            result = conn.execute(delete(key_limits).where(key_limits.c.key == key))
        if not result.rowcount:
            raise NotFoundError(f"no limit set for key {key!r}")

    def limits(self) -> list[dict[str, Any]]:
        """Every override: ``{key, max_running, updated_at}``, by key."""
        with self._tx(single=True) as conn:
            rows = conn.execute(select(key_limits).order_by(key_limits.c.key)).all()
        return [dict(r._mapping) for r in rows]

    # -- pauses -------------------------------------------------------------------

    def pause(self, key: str = PAUSE_ALL) -> bool:
        """Pause ``key`` (or the whole queue); False when it was paused already."""
        with self._tx() as conn:
            if conn.execute(select(pauses.c.key).where(pauses.c.key == key)).first():
                return False
            conn.execute(pauses.insert().values(key=key))
        return True

    def resume(self, key: str = PAUSE_ALL) -> bool:
        """Resume ``key`` (or the whole queue); False when it was not paused."""
        with self._tx(single=True) as conn:
            result = conn.execute(delete(pauses).where(pauses.c.key == key))
        return bool(result.rowcount)

    def pauses(self) -> list[dict[str, Any]]:
        with self._tx(single=True) as conn:
            rows = conn.execute(select(pauses).order_by(pauses.c.key)).all()
        return [dict(r._mapping) for r in rows]

    # -- what scanqueue queue shows per key ----------------------------------------

    def key_activity(self, default_limit: int) -> list[dict[str, Any]]:
        """Keys that hold slots or have a limit/pause: running, in flight, limit, paused."""
        with self._tx() as conn:
            running: dict[Any, int] = dict(
                conn.execute(
                    select(scans.c.effective_key, func.count())
                    .where(scans.c.status == STATUS_RUNNING)
                    .group_by(scans.c.effective_key)
                ).all()
            )
            in_flight: dict[Any, int] = dict(
                conn.execute(
                    select(scans.c.effective_key, func.count())
                    .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None))
                    .group_by(scans.c.effective_key)
                ).all()
            )
            overrides = limits_in(conn)
            paused = paused_in(conn)
        keys = sorted(
            {str(k) for k in (*running, *in_flight) if k is not None}
            | set(overrides)
            | (paused - {PAUSE_ALL})
        )
        return [
            {
                "key": k,
                "running": int(running.get(k, 0)),
                "in_flight": int(in_flight.get(k, 0)),
                "limit": overrides.get(k, default_limit),
                "limit_overridden": k in overrides,
                "paused": k in paused,
            }
            for k in keys
        ]

    # -- intake -------------------------------------------------------------------

    def has_unseen(self) -> bool:
        """Any queued row no bridge has taken in yet (a partial index makes it cheap)."""
        stmt: Any = (
            select(scans.c.id)
            .where(scans.c.status == STATUS_QUEUED, scans.c.seen_at.is_(None))
            .limit(1)
        )
        if self.dialect == "sqlite":  # the partial index by name (see take_in)
            stmt = text(
                "SELECT id FROM scans INDEXED BY scans_unseen_idx"
                " WHERE status = 'queued' AND seen_at IS NULL LIMIT 1"
            )
        with self._tx(single=True) as conn:
            return conn.execute(stmt).first() is not None

    def take_in_direct(self, limit: int = INTAKE_BATCH) -> tuple[list[Intake], bool]:
        """PostgreSQL, on this thread's held connection, one round trip: key and mark
        the unseen rows :data:`PG_INTAKE_SQL` can key; returns (those rows, whether
        any were left for :meth:`take_in`)."""
        statement = self._direct_intake
        if statement is None:
            statement = self._direct_intake = DirectStatement.from_sql(
                PG_INTAKE_SQL, PreparedForm.of(PG_INTAKE_SQL, {})
            )
        rows = self._run_direct_rows(statement, {"limit": limit})
        taken = [Intake(r["id"], r["key"]) for r in rows if r["what"] == "taken"]
        return taken, len(taken) < len(rows)

    def take_in(
        self,
        conn: Connection,
        derive: DeriveKey,
        limit: int = INTAKE_BATCH,
        *,
        ids: Sequence[str] | None = None,
    ) -> list[Intake]:
        """Within the caller's (serialized) transaction: key and mark unseen queued rows
        (with ``ids``, only those of them that are unseen).

        One SELECT of up to ``limit`` rows, then one batched UPDATE for the keyed
        rows and one for the malformed ones (failed at once with the reason).
        """
        only = ""
        params: dict[str, Any] = {"limit": limit if ids is None else len(ids)}
        if ids is not None:
            only = " AND id IN :ids"
            params["ids"] = list(ids)
        if self.dialect == "sqlite":
            # Named, or SQLite sorts every queued row (see the claim in db/claims.py).
            # Also the run_after SQLite's date functions cannot read (the column is
            # text there): such a row would never be due, so it fails instead.
            unseen: Any = text(
                "SELECT id, scan_key, providers_scanned, frameworks_scanned,"
                " CASE WHEN run_after IS NOT NULL"
                f" AND strftime('{SQLITE_TIME_FORMAT}', run_after) IS NULL"
                " THEN run_after END AS bad_run_after FROM scans"
                # Given ids: looked up by key (the unseen index may hold a whole burst).
                f"{'' if ids is not None else ' INDEXED BY scans_unseen_idx'}"
                f" WHERE status = 'queued' AND seen_at IS NULL{only}"
                " ORDER BY created_at, id LIMIT :limit"
            )
            if ids is not None:
                unseen = unseen.bindparams(bindparam("ids", expanding=True))
        else:
            unseen = (
                select(
                    scans.c.id,
                    scans.c.scan_key,
                    scans.c.providers_scanned,
                    scans.c.frameworks_scanned,
                )
                .where(scans.c.status == STATUS_QUEUED, scans.c.seen_at.is_(None))
                .where(
                    scans.c.id.in_(bindparam("ids", expanding=True)) if ids is not None else true()
                )
                .order_by(scans.c.created_at, scans.c.id)
                .limit(bindparam("limit"))
                # A row another session holds locked (a host application's open
                # transaction) waits for a later pass instead of stalling every claim.
                .with_for_update(skip_locked=True)
            )
        rows = conn.execute(unseen, params).all()
        taken: list[Intake] = []
        for row in rows:
            bad_run_after = getattr(row, "bad_run_after", None)
            if bad_run_after is not None:
                reason = f"malformed row: run_after {str(bad_run_after)[:100]!r} is not a time"
                taken.append(Intake(row.id, None, reason))
                continue
            try:
                taken.append(
                    Intake(
                        row.id, derive(row.scan_key, row.providers_scanned, row.frameworks_scanned)
                    )
                )
            except Exception as exc:
                taken.append(Intake(row.id, None, f"malformed row: {exc}"[:1000]))
        keyed = [{"b_id": t.scan_id, "b_key": t.key} for t in taken if t.error is None]
        bad = [{"b_id": t.scan_id, "b_error": t.error} for t in taken if t.error is not None]
        if keyed and self.dialect == "postgresql":
            # One statement for the batch: an executemany is a round trip a row, and
            # this runs inside the claim's serialized transaction.
            conn.execute(
                text(
                    "UPDATE scans SET effective_key = v.key, seen_at = clock_timestamp()"
                    " FROM unnest(CAST(:ids AS text[]), CAST(:keys AS text[])) AS v(id, key)"
                    " WHERE scans.id = v.id AND scans.seen_at IS NULL"
                ),
                {"ids": [k["b_id"] for k in keyed], "keys": [k["b_key"] for k in keyed]},
            )
        elif keyed:
            conn.execute(
                update(scans)
                .where(scans.c.id == bindparam("b_id"), scans.c.seen_at.is_(None))
                .values(
                    effective_key=bindparam("b_key"),
                    seen_at=self._now,
                    # The claim compares run_after as text: a row another program
                    # wrote as "2026-12-06T10:00:00Z" (or with an offset) is brought
                    # to the one form the comparison needs, in UTC; text SQLite
                    # cannot read as a time stays as it is.
                    run_after=func.coalesce(
                        func.strftime(SQLITE_TIME_FORMAT, scans.c.run_after), scans.c.run_after
                    ),
                ),
                keyed,
            )
        if bad:
            conn.execute(
                update(scans)
                .where(scans.c.id == bindparam("b_id"), scans.c.status == STATUS_QUEUED)
                .values(
                    status=STATUS_FAILED,
                    error=bindparam("b_error"),
                    finished_at=self._now,
                    seen_at=self._now,
                    **self._unreadable_run_after_cleared(),
                ),
                bad,
            )
        return taken

    def _unreadable_run_after_cleared(self) -> dict[str, Any]:
        """SQLite: a run_after that is not a time is cleared on the failed row (the
        error quotes it), or reading the row back would fail on it."""
        if self.dialect != "sqlite":
            return {}
        readable = func.strftime(SQLITE_TIME_FORMAT, scans.c.run_after).is_not(None)
        return {"run_after": case((readable, scans.c.run_after), else_=None)}
