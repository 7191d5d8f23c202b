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
default ``SCANQUEUE_MAX_RUNNING_PER_KEY``; 0 = none) is skipped, so a blocked hot
key never starves the others.  When the window is full (or has less room than
the scans waiting need) and claimable scans strictly outrank dispatched ones that
have not started, the claim *swaps*: it claims those and releases as many of the
lowest-priority dispatched scans, so a late urgent scan need not wait behind the
window's messages.  The SQL, one statement on PostgreSQL, is in
:mod:`scanqueue.db.claim_sql`.  Low priorities are not aged: while higher ones
keep coming they wait (docs/reference.md#policies says so).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

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
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement, TextClause

from scanqueue.db.claim_sql import (
    PG_PLAIN_STATEMENT_NAME,
    PG_STATEMENT_NAME,
    fast_rows,
    look_sql,
    pg_execute_sql,
    pg_one_trip_sql,
    pg_prepare_sql,
    pg_settings_sql,
    policy_claim_sql,
)
from scanqueue.db.direct_sql import DirectStatement, PreparedForm
from scanqueue.db.engine import StoreBase
from scanqueue.db.policies import DeriveKey, Intake, PoliciesMixin
from scanqueue.db.schema import (
    SQLITE_NOW_SQL,
    STATUS_QUEUED,
    STATUS_RUNNING,
    db_now_minus,
    scans,
    workers,
)

log = logging.getLogger(__name__)

# What the claim may take, as SQLite text (for the statements that name the index).
_SQLITE_CLAIMABLE = (
    "status = 'queued' AND dispatched_at IS NULL"
    f" AND (run_after IS NULL OR run_after <= {SQLITE_NOW_SQL})"
)
# pg_advisory_xact_lock key that serializes dispatch claims across bridges (any
# constant; apart from scanqueue.db.migrate's).  Held for the claim's transaction
# only, and released with the connection when a bridge dies: no TTL to wait out.
DISPATCH_LOCK_KEY = 0x5CA9_D15B
# The lock's statement also sets the planner up for the prepared claim
# (scanqueue.db.claim_sql.PG_PLANNER_SETTINGS), for this transaction only.
_PG_CLAIM_LOCK_SQL = f"SELECT pg_advisory_xact_lock(:k), {pg_settings_sql()}"
# Re-send backoff: a scan waits older_than × 2^(dispatches - 1), capped at 64×.
REDISPATCH_BACKOFF_STEPS = 7


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
            # index is read in order and the cost stays flat with the backlog.  In the
            # UPDATE, "+status" is no index term, so the rows are looked up by id rather
            # than found among every queued row.
            self._claim_stmt = text(
                f"UPDATE scans SET dispatched_at = {SQLITE_NOW_SQL},"
                " dispatch_count = dispatch_count + 1"
                " WHERE +status = 'queued' AND id IN (SELECT id FROM scans INDEXED BY"
                f" scans_claim_order_idx WHERE {_SQLITE_CLAIMABLE}"
                " ORDER BY priority DESC, created_at, id LIMIT :limit)"
                " RETURNING id, created_at, priority"
            )
        self._look_stmts: dict[bool, TextClause] = {
            unseen: text(look_sql(self.dialect, unseen)) for unseen in (False, True)
        }
        # PostgreSQL: on the bridge's held connection, prepared (planning the look
        # cost three times its execution).
        self._direct_looks: dict[bool, DirectStatement] = (
            {
                unseen: DirectStatement(look, self._autocommit_engine)
                for unseen, look in self._look_stmts.items()
            }
            if self._direct is not None
            else {}
        )
        # Whether the last PostgreSQL claim found a pause or limit (None: none ran yet),
        # and whether it left unseen rows (beyond those it claimed and took in).
        self._claim_policed: bool | None = None
        self._claim_left_unseen = True
        if self.dialect == "postgresql":
            self._pg_prepare = pg_prepare_sql()
            self._pg_execute = pg_execute_sql()
            # Lock and claim in one round trip, on the bridge's held connection: the
            # whole statement, or (while the last claim found no pause or limit) the
            # plain one, which leaves out the key-room machinery (a third of the claim's
            # round trip) and claims nothing should a pause or limit exist after all.
            self._direct_claims = {
                plain: DirectStatement.from_sql(
                    pg_one_trip_sql(DISPATCH_LOCK_KEY, prepared=False, plain=plain),
                    PreparedForm(
                        PG_PLAIN_STATEMENT_NAME if plain else PG_STATEMENT_NAME,
                        pg_prepare_sql(plain=plain),
                        pg_one_trip_sql(DISPATCH_LOCK_KEY, prepared=True, plain=plain),
                    ),
                )
                for plain in (False, True)
            }
        else:
            # By id alone: BEGIN IMMEDIATE has kept every other writer out since the
            # plan's SELECT saw these rows, and with a status term SQLite would rather
            # read every queued row through (status, created_at) than look up a few ids.
            self._sqlite_claim_plan: Executable = text(policy_claim_sql("sqlite"))
            self._claim_ids_stmt: Executable = (
                update(scans)
                .where(scans.c.id.in_(bindparam("ids", expanding=True)))
                .values(dispatched_at=self._now, dispatch_count=scans.c.dispatch_count + 1)
                .returning(scans.c.id, scans.c.created_at, scans.c.priority)
            )
            self._release_ids_stmt: Executable = (
                update(scans)
                .where(scans.c.id.in_(bindparam("ids", expanding=True)))
                .values(dispatched_at=None)
                .returning(scans.c.id)
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
        released: list[str] | None = None,
        min_room: int = 1,
        look: bool = True,
        take_in: bool = False,
    ) -> tuple[list[str], int]:
        """Claim ``min(limit, window - in_flight)`` scans; returns (ids, room left).

        With ``min_room``, a window with some scans in flight is refilled only once
        that much room is free (a swap, or an empty window, claims at once): under a
        backlog every start frees one place, and claiming each alone made the claim
        a per-scan cost.

        The policies apply (module docstring); ``key_limit`` is the default per-key
        limit.  With ``derive``, unseen queued rows are first taken in (PostgreSQL:
        :meth:`PoliciesMixin.take_in_direct` first; :meth:`PoliciesMixin.take_in`, in
        the serialized transaction, for what it leaves), and appended to ``intake``.
        When claimable scans outrank dispatched ones that have not started, up to
        ``limit`` in all are claimed and as many of the lowest are released
        (``dispatched_at`` NULL again: queued, their messages stale); their ids are
        appended to ``released``.

        ``in_flight`` is the queued rows with ``dispatched_at`` set: handed to the
        broker, not started.  Count and claim must see the same state, so claims
        are serialized in the database — PostgreSQL: a transaction-scoped advisory
        lock (a dead claimer's lock goes with its connection); SQLite: ``BEGIN
        IMMEDIATE`` takes the write lock before the count.  Every bridge may claim,
        and the window stays exact across them.

        ``look=False`` skips the unlocked look (below) when the caller knows there is
        room (starts it was told of, or room its last claim left), and then takes rows
        in only with ``take_in`` (it was told rows were inserted).  On PostgreSQL a
        claim is one round trip (lock and claim in one implicit transaction), and
        so is the intake of well-formed rows before it
        (:meth:`PoliciesMixin.take_in_direct`); only malformed ones take the
        serialized transaction's path.
        """
        # A look without the lock first: while the window is full and nothing waiting
        # outranks what is in flight (a saturated backlog, looked at many times a
        # second) no lock is taken at all.  Safe: the claim itself judges under the
        # lock, so a stale look only delays a claim or a swap to the next look.
        unseen, claimable, in_flight = derive is not None and take_in, True, 0
        if look:
            state = self._look(unseen=derive is not None)
            in_flight = int(state["in_flight"])
            unseen = derive is not None and bool(state["unseen"])
            top, lowest = state["top"], state["lowest"]
            swap = top is not None and lowest is not None and top > lowest
            room = window - in_flight
            claimable = not state["all_paused"] and (
                room >= min(max(1, min_room), window) or (in_flight == 0 and room > 0) or swap
            )
            if not claimable and not unseen:
                return [], max(0, window - in_flight)
        if unseen and self._direct_looks:
            # PostgreSQL: the rows SQL can key are taken in with one round trip of
            # their own; take_in below sees only what it left (malformed rows).
            taken, unseen = self.take_in_direct()
            if intake is not None:
                intake.extend(taken)
            if not claimable and not unseen:
                return [], max(0, window - in_flight)
        if not unseen and self._direct_looks:
            claimed, freed, in_flight = self._claim_one_trip(limit, window, key_limit)
        else:
            with self._serialized_tx() as conn:
                if derive is not None and unseen:
                    taken = self.take_in(conn, derive)
                    if intake is not None:
                        intake.extend(taken)
                if not claimable:
                    return [], max(0, window - in_flight)
                claimed, freed, in_flight = self._claim_with_policies(
                    conn, limit, window, key_limit, derive=derive, intake=intake
                )
        if intake is not None:
            # Rows the claim took before any intake saw them (a burst of more unseen
            # rows than one intake takes): marked seen by the claim itself, with their key.
            intake.extend(Intake(r.id, r.key) for r in claimed if getattr(r, "key", None))
        if released is not None:
            released.extend(freed)
        return _oldest_first(claimed), max(0, window - in_flight - len(claimed) + len(freed))

    def claims_unseen(self) -> bool:
        """Whether a claim would take in the unseen rows it picks, with no intake
        first: PostgreSQL on a held connection (the claim statement keys such rows
        itself, as the intake would, and judges them by that key).  A caller that
        claims so runs :meth:`take_in_rest` afterwards."""
        return bool(self._direct_looks)

    def last_claim_policed(self) -> bool:
        """Whether the last claim found a pause or limit (and so may have passed over
        unseen rows a deeper search of the backlog would have found once keyed)."""
        return bool(self._claim_policed)

    def take_in_rest(self, derive: DeriveKey) -> list[Intake]:
        """After a claim :meth:`claims_unseen` chose, the intake it left (rows beyond
        what it claimed, malformed ones): :meth:`PoliciesMixin.take_in_direct`, then
        :meth:`PoliciesMixin.take_in` in the serialized transaction for the rows SQL
        cannot key.  Nothing, and no round trip, when the claim left no unseen row."""
        if not self._claim_left_unseen:
            return []
        taken, left = self.take_in_direct()
        if left:
            with self._serialized_tx() as conn:
                taken.extend(self.take_in(conn, derive))
        return taken

    def _look(self, *, unseen: bool) -> Mapping[str, Any]:
        """The window's state, without the lock (see :func:`look_sql`)."""
        if self._direct_looks:
            row, _ = self._run_direct(self._direct_looks[unseen], {})
            assert row is not None  # an aggregate: always one row
            return cast(Mapping[str, Any], row)
        with self._tx(single=True) as conn:
            return dict(conn.execute(self._look_stmts[unseen]).one()._mapping)

    def _claim_one_trip(
        self, limit: int, window: int, key_limit: int
    ) -> tuple[list[Any], list[str], int]:
        """PostgreSQL, nothing to take in: lock and claim in one round trip (two when
        the plain claim finds that a pause or limit has appeared)."""
        params = self._claim_params(limit, window, key_limit)
        plain = key_limit == 0 and self._claim_policed is False
        rows = self._run_direct_rows(self._direct_claims[plain], params)
        counted = next(r for r in rows if r["what"] == "in_flight")
        if plain and counted["policed"]:
            rows = self._run_direct_rows(self._direct_claims[False], params)
            counted = next(r for r in rows if r["what"] == "in_flight")
        in_flight, self._claim_policed = int(counted["n"]), bool(counted["policed"])
        self._claim_left_unseen = bool(counted["unseen_left"])
        claimed = [SimpleNamespace(**r) for r in rows if r["what"] == "claimed"]
        return claimed, [r["id"] for r in rows if r["what"] == "released"], in_flight

    @staticmethod
    def _claim_params(limit: int, window: int, key_limit: int) -> dict[str, int]:
        cap = max(0, min(limit, window))
        return {
            "key_limit": key_limit,
            "limit": limit,
            "window": window,
            "cap": cap,
            "m": fast_rows(cap),
        }

    def _claim_with_policies(
        self,
        conn: Connection,
        limit: int,
        window: int,
        key_limit: int,
        *,
        derive: DeriveKey | None = None,
        intake: list[Intake] | None = None,
    ) -> tuple[list[Row[Any]], list[str], int]:
        """Within the serialized transaction: (claimed rows, released ids, in flight before).

        A row picked before any intake saw it is taken in first (SQLite, with
        ``derive``; PostgreSQL's statement does it itself): keyed and marked seen,
        appended to ``intake``, or failed (malformed) and not claimed."""
        params = self._claim_params(limit, window, key_limit)
        if self.dialect == "postgresql":
            rows = self._run_prepared_claim(conn, params)
            counted = next(r for r in rows if r.what == "in_flight")
            in_flight, self._claim_policed = int(counted.n), bool(counted.policed)
            self._claim_left_unseen = bool(counted.unseen_left)
            claimed = [r for r in rows if r.what == "claimed"]
            return claimed, [r.id for r in rows if r.what == "released"], in_flight
        try:
            picks = conn.execute(self._sqlite_claim_plan, params).all()
        except sa_exc.OperationalError as exc:
            if "scans_key_claim_order_idx" not in str(exc):
                raise
            # Code newer than the schema (a deploy before `scanqueue db upgrade`):
            # claim without the index, once warned, rather than not at all.
            log.warning(
                "the claim runs without scans_key_claim_order_idx, which is slower: the"
                " schema is older than this code (run `scanqueue db upgrade`)"
            )
            self._sqlite_claim_plan = text(policy_claim_sql("sqlite", key_index=False))
            picks = conn.execute(self._sqlite_claim_plan, params).all()
        in_flight = next(int(r.n) for r in picks if r.what == "in_flight")
        to_claim = [r.id for r in picks if r.what == "claimed"]
        to_release = [r.id for r in picks if r.what == "released"]
        if derive is not None and to_claim:
            taken = self.take_in(conn, derive, ids=to_claim)
            failed = {t.scan_id for t in taken if t.error is not None}
            to_claim = [i for i in to_claim if i not in failed]
            if intake is not None:
                intake.extend(taken)
        claimed = list(conn.execute(self._claim_ids_stmt, {"ids": to_claim})) if to_claim else []
        freed = (
            [r.id for r in conn.execute(self._release_ids_stmt, {"ids": to_release})]
            if to_release
            else []
        )
        return claimed, freed, in_flight

    def _run_prepared_claim(self, conn: Connection, params: dict[str, int]) -> list[Row[Any]]:
        """PostgreSQL, within the serialized transaction (the intake's path): the claim
        as a statement prepared once per database session and planned once
        (``PG_PLANNER_SETTINGS``, set with the lock).  Whether the session has it is
        asked in the same transaction, not remembered: behind a transaction-pooling
        proxy each transaction may run in another server session."""
        known = conn.exec_driver_sql(
            "SELECT 1 FROM pg_prepared_statements WHERE name = %(name)s",
            {"name": PG_STATEMENT_NAME},
        ).first()
        if known is None:
            conn.exec_driver_sql(self._pg_prepare)
        return list(conn.exec_driver_sql(self._pg_execute, params).all())

    def _serialized_tx(self) -> AbstractContextManager[Connection]:
        """A transaction that holds the dispatch lock from its first statement."""
        return self._locked_tx(_PG_CLAIM_LOCK_SQL, {"k": DISPATCH_LOCK_KEY})

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
        stmt: Executable = (
            update(scans)
            .where(scans.c.id.in_(list(scan_ids)), scans.c.status == STATUS_QUEUED)
            .values(dispatched_at=None)
        )
        if self.dialect == "sqlite":
            # "+status": not an index term, so SQLite looks the ids up by key instead
            # of reading every queued row through (status, created_at).
            stmt = text(
                "UPDATE scans SET dispatched_at = NULL WHERE id IN :ids AND +status = 'queued'"
            ).bindparams(bindparam("ids", list(scan_ids), expanding=True))
        with self._tx(single=True) as conn:
            conn.execute(stmt)

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

        * it was *overtaken*: a scan of the same or a lower priority, dispatched
          over ``overtaken_margin_s`` after it, is running already (the broker
          hands messages out in order, so an older one that is still waiting was
          dropped, or is held by a dead consumer; a higher-priority scan may
          legitimately start first, since a start runs the best scan dispatched);
          or
        * slots are *free*: fewer scans run than ``live_slots``, so nothing should
          be waiting at all.

        A false positive costs a duplicate message, which the task's compare-and-
        set absorbs; the backoff bounds how many.  Due-ness is decided in SQL, so
        a scan not yet due never takes the place of a due one in the ``limit``.
        """
        with self._tx() as conn:
            due = self._redispatch_due(older_than_s)
            if lost_after_s is not None:
                # The newest dispatch among running scans, per priority: at most the
                # slots' rows, so a few terms.
                newest = conn.execute(
                    select(scans.c.priority, func.count(), func.max(scans.c.dispatched_at))
                    .where(scans.c.status == STATUS_RUNNING)
                    .group_by(scans.c.priority)
                ).all()
                running = sum(int(n) for _, n, _ in newest)
                evidence: list[ColumnElement[bool]] = []
                if live_slots is not None and running < live_slots:
                    evidence.append(true())
                for i, (priority, _, newest_at) in enumerate(newest):
                    if newest_at is None:
                        continue
                    evidence.append(
                        and_(
                            scans.c.priority >= (priority or 0),
                            scans.c.dispatched_at
                            < bindparam(
                                f"overtaken_before_{i}",
                                newest_at - timedelta(seconds=overtaken_margin_s),
                                type_=scans.c.dispatched_at.type,
                            ),
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


def _oldest_first(rows: Sequence[Any]) -> list[str]:
    """Claim order: higher priority first, then oldest (publish order = start order)."""
    ordered = sorted(
        rows, key=lambda r: (-(r.priority or 0), r.created_at is None, r.created_at, r.id)
    )
    return [r.id for r in ordered]
