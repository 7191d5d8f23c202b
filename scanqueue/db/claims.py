"""The bridge's statements: claims under the dispatch window, release, re-send, live workers.

Owns marking queued scans as dispatched (higher priority first, then oldest;
never twice, never more than the window in flight across every bridge), undoing
a claim whose publish failed, re-claiming scans whose message the broker lost
(with backoff), and the ``workers`` registry whose live slots are the window's
default.

The claim enforces the scan policies (docs/reference.md#policies) inside its serialized
transaction: ``run_after`` in the future is skipped; nothing is claimed while
the whole queue is paused; paused keys are skipped; a key whose running plus
dispatched-not-started scans reach its limit (``scanqueue_limits``, else the
default ``SCANQUEUE_MAX_RUNNING_PER_KEY``; 0 = none) is skipped, and the claim
pages past it (each page excludes every key already full), so a blocked hot
key never starves the others.  Without limits or key pauses the claim is the
one statement it always was.  Low priorities are not aged: while higher ones
keep coming they wait (docs/reference.md#policies says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Row,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement

from scanqueue.db.engine import StoreBase
from scanqueue.db.policies import (
    DeriveKey,
    Intake,
    PoliciesMixin,
    active_in,
    limits_in,
    paused_in,
)
from scanqueue.db.schema import (
    PAUSE_ALL,
    SQLITE_NOW_SQL,
    STATUS_QUEUED,
    STATUS_RUNNING,
    db_now_minus,
    scans,
    workers,
)

# What the claim may take, as SQLite text (for the statements that name the index).
_SQLITE_CLAIMABLE = (
    "status = 'queued' AND dispatched_at IS NULL"
    f" AND (run_after IS NULL OR run_after <= {SQLITE_NOW_SQL})"
)
# pg_advisory_xact_lock key that serializes dispatch claims across bridges (any
# constant; apart from scanqueue.db.migrate's).  Held for the claim's transaction
# only, and released with the connection when a bridge dies: no TTL to wait out.
DISPATCH_LOCK_KEY = 0x5CA9_D15B
# Re-send backoff: a scan waits older_than × 2^(dispatches - 1), capped at 64×.
REDISPATCH_BACKOFF_STEPS = 7
# A claim under per-key limits reads candidates a page at a time, each page skipping
# the keys already full; at most CLAIM_MAX_PAGES pages per claim (the next pass goes on).
CLAIM_PAGE_MIN = 200
CLAIM_MAX_PAGES = 20


class ClaimsMixin(PoliciesMixin, StoreBase):
    """Dispatch claims and the worker registry."""

    def _build_claim_statement(self) -> None:
        """The claim, built once (building it is most of its CPU cost)."""
        now = self._now
        # A materialized CTE, not ``IN (subquery)``: PostgreSQL may re-run a LIMIT
        # subquery per outer row and so claim more than ``limit`` rows.
        self._due = or_(scans.c.run_after.is_(None), scans.c.run_after <= now)
        oldest = (
            select(scans.c.id)
            .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_(None), self._due)
            .order_by(scans.c.priority.desc(), scans.c.created_at, scans.c.id)
            .limit(bindparam("limit", type_=Integer))
            .with_for_update(skip_locked=True)
            .cte("oldest")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        self._claim_stmt: Executable = (
            update(scans)
            .where(scans.c.id == oldest.c.id, scans.c.status == STATUS_QUEUED)
            .values(dispatched_at=now, dispatch_count=scans.c.dispatch_count + 1)
            .returning(scans.c.id, scans.c.created_at, scans.c.priority)
        )
        if self.dialect == "sqlite":
            # Without statistics SQLite prefers the (status, created_at) index and then
            # sorts every queued row by priority: named here, the partial claim-order
            # index is read in order and the cost stays flat with the backlog.
            self._claim_stmt = text(
                f"UPDATE scans SET dispatched_at = {SQLITE_NOW_SQL},"
                " dispatch_count = dispatch_count + 1"
                " WHERE status = 'queued' AND id IN (SELECT id FROM scans INDEXED BY"
                f" scans_claim_order_idx WHERE {_SQLITE_CLAIMABLE}"
                " ORDER BY priority DESC, created_at, id LIMIT :limit)"
                " RETURNING id, created_at, priority"
            )

    def claim_for_dispatch(self, limit: int, window: int | None = None) -> list[str]:
        """Mark up to ``limit`` undispatched queued scans as dispatched, oldest first.

        With a ``window``, never more than ``window`` scans dispatched but not yet
        started in all (see :meth:`claim_within_window`).  Without one: one
        statement, ``FOR UPDATE SKIP LOCKED`` keeping concurrent claims apart.
        """
        if window is not None:
            return self.claim_within_window(limit, window)[0]
        with self._tx(single=True) as conn:
            rows = conn.execute(self._claim_stmt, {"limit": limit}).all()
        return _oldest_first(rows)

    def claim_within_window(
        self,
        limit: int,
        window: int,
        *,
        key_limit: int = 0,
        derive: DeriveKey | None = None,
        intake: list[Intake] | None = None,
    ) -> tuple[list[str], int]:
        """Claim ``min(limit, window - in_flight)`` scans; returns (ids, room left).

        The policies apply (module docstring); ``key_limit`` is the default per-key
        limit.  With ``derive``, unseen queued rows are first taken in, in the same
        transaction (:meth:`PoliciesMixin.take_in`), and appended to ``intake``.

        ``in_flight`` is the queued rows with ``dispatched_at`` set: handed to the
        broker, not started.  Count and claim must see the same state, so claims
        are serialized in the database — PostgreSQL: a transaction-scoped advisory
        lock (a few milliseconds per claim; a dead claimer's lock goes with its
        connection); SQLite: ``BEGIN IMMEDIATE`` takes the write lock before the
        count.  Every bridge may claim, and the window stays exact across them.
        """
        in_flight_stmt = self._in_flight_stmt()
        # A look without the lock first: while the window is full (a saturated
        # backlog, looked at many times a second) no lock is taken at all.  Safe:
        # only claims (serialized) fill the window, so "full" can only be stale
        # towards "room", which the next look finds.
        with self._tx(single=True) as conn:
            full = int(conn.execute(in_flight_stmt).scalar_one()) >= window
        if full and (derive is None or not self.has_unseen()):
            return [], 0
        with self._serialized_tx() as conn:
            if derive is not None:
                taken = self.take_in(conn, derive)
                if intake is not None:
                    intake.extend(taken)
            in_flight = int(conn.execute(in_flight_stmt).scalar_one())
            take = max(0, min(limit, window - in_flight))
            rows = self._claim_with_policies(conn, take, key_limit) if take else []
        return _oldest_first(rows), max(0, window - in_flight - len(rows))

    def _claim_with_policies(self, conn: Connection, take: int, key_limit: int) -> list[Row[Any]]:
        """Within the serialized transaction: up to ``take`` claimable scans, claimed."""
        paused = paused_in(conn)
        if PAUSE_ALL in paused:
            return []
        overrides = limits_in(conn)
        if not paused and not overrides and key_limit <= 0:
            return list(conn.execute(self._claim_stmt, {"limit": take}).all())
        active = active_in(conn)

        def limit_of(key: str) -> int:
            return overrides.get(key, key_limit)

        full = {k for k, n in active.items() if 0 < limit_of(k) <= n}
        page = max(CLAIM_PAGE_MIN, 2 * take)
        claimed: list[Row[Any]] = []
        for _ in range(CLAIM_MAX_PAGES):
            # Unkeyed rows wait for intake (the same transaction keys them first).
            blocked = sorted(paused | full)
            candidates = conn.execute(
                self._candidates_stmt(bool(blocked)),
                {"page": page, "blocked": blocked} if blocked else {"page": page},
            ).all()
            picked: list[str] = []
            for scan_id, key in candidates:
                if len(claimed) + len(picked) >= take:
                    break
                if key in full:
                    continue
                picked.append(scan_id)
                active[key] = active.get(key, 0) + 1
                if 0 < limit_of(key) <= active[key]:
                    full.add(key)
            if picked:
                claimed.extend(
                    conn.execute(
                        update(scans)
                        .where(
                            scans.c.id.in_(picked),
                            scans.c.status == STATUS_QUEUED,
                            scans.c.dispatched_at.is_(None),
                        )
                        .values(dispatched_at=self._now, dispatch_count=scans.c.dispatch_count + 1)
                        .returning(scans.c.id, scans.c.created_at, scans.c.priority)
                    ).all()
                )
            if len(claimed) >= take or len(candidates) < page or not picked:
                break
        return claimed

    def _candidates_stmt(self, with_blocked: bool) -> Executable:
        """Claimable keyed scans in claim order, a page of them (``:page``), skipping the
        keys in ``:blocked`` (paused or full) when ``with_blocked``."""
        if self.dialect == "sqlite":  # the claim-order index by name: see the claim
            skip = " AND effective_key NOT IN :blocked" if with_blocked else ""
            stmt = text(
                "SELECT id, effective_key FROM scans INDEXED BY scans_claim_order_idx"
                f" WHERE {_SQLITE_CLAIMABLE} AND effective_key IS NOT NULL{skip}"
                " ORDER BY priority DESC, created_at, id LIMIT :page"
            )
            return stmt.bindparams(bindparam("blocked", expanding=True)) if with_blocked else stmt
        query = select(scans.c.id, scans.c.effective_key).where(
            scans.c.status == STATUS_QUEUED,
            scans.c.dispatched_at.is_(None),
            self._due,
            scans.c.effective_key.is_not(None),
        )
        if with_blocked:
            query = query.where(scans.c.effective_key.not_in(bindparam("blocked", expanding=True)))
        return query.order_by(scans.c.priority.desc(), scans.c.created_at, scans.c.id).limit(
            bindparam("page", type_=Integer)
        )

    def _serialized_tx(self) -> AbstractContextManager[Connection]:
        """A transaction that holds the dispatch lock from its first statement."""
        return self._locked_tx("SELECT pg_advisory_xact_lock(:k)", {"k": DISPATCH_LOCK_KEY})

    def in_flight(self) -> int:
        """Scans dispatched but not started (queued with ``dispatched_at`` set)."""
        with self._tx(single=True) as conn:
            return int(conn.execute(self._in_flight_stmt()).scalar_one())

    def _in_flight_stmt(self) -> Executable:
        if self.dialect == "sqlite":  # the partial index by name, as in the claim
            return text(
                "SELECT count(*) FROM scans INDEXED BY scans_queued_dispatched_idx"
                " WHERE status = 'queued' AND dispatched_at IS NOT NULL"
            )
        return (
            select(func.count())
            .select_from(scans)
            .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None))
        )

    def release_dispatch(self, scan_ids: Sequence[str]) -> None:
        """Undo a claim whose publish failed, so the next pass retries it."""
        if not scan_ids:
            return
        with self._tx(single=True) as conn:
            conn.execute(
                update(scans)
                .where(scans.c.id.in_(list(scan_ids)), scans.c.status == STATUS_QUEUED)
                .values(dispatched_at=None)
            )

    def claim_for_redispatch(
        self,
        older_than_s: float,
        limit: int,
        *,
        lost_after_s: float | None = None,
        live_slots: int | None = None,
        overtaken_margin_s: float = 1.0,
    ) -> list[str]:
        """Queued scans dispatched and never started whose message the broker lost.

        A scan is re-sent when it has waited ``older_than_s × 2^(dispatches-1)``
        (capped at 64×) since its last dispatch, or — with ``lost_after_s`` — the
        shorter ``lost_after_s × 2^(dispatches-1)`` when the evidence says its
        message is gone rather than queued behind others:

        * it was *overtaken*: a scan dispatched over ``overtaken_margin_s`` after it
          is running already (the broker hands messages out in order, so an older
          one that is still waiting was dropped, or is held by a dead consumer); or
        * slots are *free*: fewer scans run than ``live_slots``, so nothing should
          be waiting at all.

        A false positive costs a duplicate message, which the task's compare-and-
        set absorbs; the backoff bounds how many.  Due-ness is decided in SQL, so
        a scan not yet due never takes the place of a due one in the ``limit``.
        """
        with self._tx() as conn:
            due = self._redispatch_due(older_than_s)
            if lost_after_s is not None:
                running, newest_running = conn.execute(
                    select(func.count(), func.max(scans.c.dispatched_at)).where(
                        scans.c.status == STATUS_RUNNING
                    )
                ).one()
                evidence: list[ColumnElement[bool]] = []
                if live_slots is not None and running < live_slots:
                    evidence.append(true())
                if newest_running is not None:
                    evidence.append(
                        scans.c.dispatched_at
                        < bindparam(
                            "overtaken_before",
                            newest_running - timedelta(seconds=overtaken_margin_s),
                            type_=scans.c.dispatched_at.type,
                        )
                    )
                if evidence:
                    due = or_(due, and_(or_(*evidence), self._redispatch_due(lost_after_s)))
            candidates = conn.execute(
                select(scans.c.id, scans.c.dispatch_count)
                .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None), due)
                .order_by(scans.c.dispatched_at)
                .limit(limit)
            ).all()
            claimed: list[str] = []
            for scan_id, count in candidates:
                result = conn.execute(
                    update(scans)
                    .where(
                        scans.c.id == scan_id,
                        scans.c.status == STATUS_QUEUED,
                        # The count moves on every claim: a CAS token that, unlike a
                        # timestamp, compares exactly on SQLite too.
                        scans.c.dispatch_count == count,
                    )
                    .values(dispatched_at=self._now, dispatch_count=scans.c.dispatch_count + 1)
                )
                if result.rowcount == 1:
                    claimed.append(scan_id)
        return claimed

    def _redispatch_due(self, base_s: float) -> ColumnElement[bool]:
        """``dispatched_at`` older than ``base_s × 2^(dispatch_count-1)``, capped at 64×."""
        levels: list[ColumnElement[bool]] = []
        last = REDISPATCH_BACKOFF_STEPS - 1
        for step in range(REDISPATCH_BACKOFF_STEPS):
            if step == 0:
                count_is = scans.c.dispatch_count <= 1
            elif step == last:
                count_is = scans.c.dispatch_count >= step + 1
            else:
                count_is = scans.c.dispatch_count == step + 1
            cutoff = db_now_minus(self.dialect, base_s * 2**step)
            levels.append(and_(count_is, scans.c.dispatched_at < cutoff))
        return or_(*levels)

    # -- live workers (the dispatch window's default) ----------------------------------

    def register_worker(self, worker_id: str, hostname: str, pid: int, slots: int) -> None:
        """Insert or refresh this worker's row (``heartbeat_at`` = now)."""
        with self._tx(single=True) as conn:
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
            stmt = dialect_insert(workers).values(
                id=worker_id, hostname=hostname, pid=pid, slots=slots
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[workers.c.id],
                    set_={"slots": slots, "heartbeat_at": self._now},
                )
            )

    def unregister_worker(self, worker_id: str) -> None:
        with self._tx(single=True) as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    def live_workers(self, stale_after_s: float) -> list[dict[str, Any]]:
        """Registered workers whose heartbeat is fresher than ``stale_after_s``."""
        with self._tx(single=True) as conn:
            rows = conn.execute(
                select(workers)
                .where(workers.c.heartbeat_at >= db_now_minus(self.dialect, stale_after_s))
                .order_by(workers.c.started_at, workers.c.id)
            ).all()
        return [dict(r._mapping) for r in rows]

    def live_worker_slots(self, stale_after_s: float) -> int:
        with self._tx(single=True) as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(workers.c.slots), 0)).where(
                        workers.c.heartbeat_at >= db_now_minus(self.dialect, stale_after_s)
                    )
                ).scalar_one()
            )

    def forget_workers(self, stale_after_s: float) -> int:
        """Delete registrations silent for ``stale_after_s`` (workers that died)."""
        with self._tx(single=True) as conn:
            result = conn.execute(
                delete(workers).where(
                    workers.c.heartbeat_at < db_now_minus(self.dialect, stale_after_s)
                )
            )
        return int(result.rowcount or 0)


def _oldest_first(rows: Sequence[Row[Any]]) -> list[str]:
    """Claim order: higher priority first, then oldest (publish order = start order)."""
    ordered = sorted(
        rows, key=lambda r: (-(r.priority or 0), r.created_at is None, r.created_at, r.id)
    )
    return [r.id for r in ordered]
