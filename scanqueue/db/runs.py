"""The worker's and the reaper's statements: one run of a scan, start to finish.

Owns the per-scan hot statements (built once; on PostgreSQL run through
:mod:`scanqueue.db.direct_sql`), the compare-and-set transitions of a run —
start, heartbeat, finish, retry, hand-back — and the reaper that re-queues or
fails runs whose heartbeat stopped.  Two budgets (docs/reference.md#policies): ``retries``
counts runner failures put back by :meth:`RunsMixin.retry_run`, and the reaper
fails a scan once ``attempts - retries`` (runs lost, not retried) reaches
``SCANQUEUE_MAX_ATTEMPTS``; a graceful hand-back spends neither.  The state
machine they implement is drawn in :mod:`scanqueue.db.store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    Text,
    Update,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ColumnElement

from scanqueue.db.direct_sql import DirectStatement, PreparedForm
from scanqueue.db.engine import StoreBase
from scanqueue.db.rows import (
    FINISH_COLUMNS,
    FinishedRun,
    ReapedScan,
    StartedRun,
    SuccessorWindow,
)
from scanqueue.db.schema import (
    FINISHED_STATUSES,
    STATUS_FAILED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    UTCDateTime,
    db_now_minus,
    scans,
)

MAX_ERROR_CHARS = 4000
# SQLite: the dispatched, unstarted rows (the window), as ``other``, read through their
# partial index.
_SQLITE_IN_FLIGHT = (
    "scans AS other INDEXED BY scans_queued_dispatched_idx"
    " WHERE other.status = 'queued' AND other.dispatched_at IS NOT NULL"
)


@dataclass(frozen=True)
class RetriedRun:
    """A failed run put back to ``queued``: when it may start again, retries so far."""

    run_after: datetime | None
    retries: int


def _now_plus_seconds(dialect: str) -> ColumnElement[Any]:
    """The database clock plus the ``delay_s`` parameter (the claim compares run_after
    with the same clock)."""
    delay = bindparam("delay_s", type_=Float)
    if dialect == "postgresql":
        return literal_column("clock_timestamp()", UTCDateTime()) + func.make_interval(
            0, 0, 0, 0, 0, 0, delay
        )
    return func.strftime(
        "%Y-%m-%d %H:%M:%f", "now", func.printf("+%.3f seconds", delay), type_=UTCDateTime()
    )


class RunsMixin(StoreBase):
    """A run's transitions and the reaper."""

    def _build_run_statements(self) -> None:
        """The per-scan statements, built once (building them is most of their CPU cost)."""
        now = self._now
        self._build_start_statements()
        # A run is (scan, attempt, worker): a graceful hand-back gives its attempt
        # back (no crash budget spent), so the next run may reuse the number, and
        # only the worker id still tells a straggler of the old run from the new one.
        # A NULL worker id matches any (callers outside a worker, the tests).
        run_worker = bindparam("run_worker", value=None, type_=Text, required=False)
        this_run = (
            scans.c.id == bindparam("scan_id"),
            scans.c.status == STATUS_RUNNING,
            scans.c.attempts == bindparam("attempt"),
            # The cast lets PostgreSQL infer the type when the statement is prepared.
            or_(cast(run_worker, Text).is_(None), scans.c.worker_id == run_worker),
        )
        self._heartbeat_stmt = update(scans).where(*this_run).values(heartbeat_at=now)
        self._hand_back_run_stmt = (
            update(scans)
            .where(*this_run)
            .values(status=STATUS_QUEUED, dispatched_at=None, heartbeat_at=None, worker_id=None)
        )
        # A runner failure with retries left: back to queued, not before run_after.
        # started_at stays (the last run's), seen_at too (no second scan.queued).
        self._retry_stmt = (
            update(scans)
            .where(*this_run)
            .values(
                status=STATUS_QUEUED,
                retries=scans.c.retries + 1,
                run_after=_now_plus_seconds(self.dialect),
                error=bindparam("error"),
                dispatched_at=None,
                heartbeat_at=None,
                worker_id=None,
            )
            .returning(scans.c.run_after, scans.c.retries)
        )
        self._finish_stmt = (
            update(scans)
            .where(*this_run)
            .values(
                status=bindparam("new_status"),
                finished_at=now,
                error=bindparam("error"),
                findings_count=func.coalesce(
                    bindparam("findings_count", type_=Integer), scans.c.findings_count
                ),
            )
            .returning(*FINISH_COLUMNS)
        )
        self._status_stmt = select(scans.c.status, scans.c.attempts).where(
            scans.c.id == bindparam("scan_id")
        )
        # PostgreSQL: the per-scan statements skip SQLAlchemy's per-call work (see
        # StoreBase: only on the store's own autocommit engine).
        if self._direct is not None:
            self._direct_start = DirectStatement(self._start_stmt, self._autocommit_engine)
            self._direct_start_swap = DirectStatement(
                self._start_swap_stmt, self._autocommit_engine
            )
            self._direct_start_successor = _start_with_successor(self._direct_start)
            self._direct_heartbeat = DirectStatement(self._heartbeat_stmt, self._autocommit_engine)
            self._direct_finish = DirectStatement(self._finish_stmt, self._autocommit_engine)
            # A run's other statements too, so that each has the client-side deadline
            # (a hand-back to a stalled database must not hold a pool process for ever).
            self._direct_status = DirectStatement(self._status_stmt, self._autocommit_engine)
            self._direct_hand_back_run = DirectStatement(
                self._hand_back_run_stmt, self._autocommit_engine
            )
            self._direct_retry = DirectStatement(self._retry_stmt, self._autocommit_engine)

    def _build_start_statements(self) -> None:
        """The start, built once: a message is a start token (docs/reference.md#lifecycle).

        Only a claimed scan starts (``queued`` with ``dispatched_at`` set): the claim
        enforced the window, limits, pauses and run-after, so the stale message of a
        scan that was released or handed back starts nothing.  When the message's own
        scan may start, the dispatched scan of the highest priority strictly above it
        (then the oldest) starts in its place, if there is one, and the own scan is
        released (``dispatched_at`` NULL, still queued) for the bridge to claim again
        with a message of its own: a priority scan claimed behind a full window
        starts on the next free slot.

        Two statements: ``_start_stmt`` starts the own scan when nothing of higher
        priority is dispatched (the usual case: one statement, the in-flight rows read
        through their partial index, at most the window); when it starts nothing,
        the swap (``_start_swap_stmt``) decides, in one transaction.
        """
        now = self._now
        dispatched = (scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None))
        start_values: dict[str, Any] = {
            "status": STATUS_RUNNING,
            "attempts": scans.c.attempts + 1,
            "started_at": now,
            "heartbeat_at": now,
            "finished_at": None,
            "error": None,
            # A scan's findings are its last run's: a re-run starts from none,
            # and without the previous run's diff (docs/reference.md#findings-over-time).
            "findings_count": 0,
            "findings_new": None,
            "findings_fixed": None,
            "baseline_id": None,
            # Not named like a column: SQLAlchemy would add such a parameter to the
            # SET of every UPDATE in the statement (the release too).
            "worker_id": bindparam("start_worker", type_=Text),
        }
        returned = (
            scans.c.id,
            scans.c.attempts,
            scans.c.providers_scanned,
            scans.c.frameworks_scanned,
            scans.c.triggered_by_user,
            scans.c.triggered_by_token,
            scans.c.created_at,
            scans.c.started_at,
            scans.c.timeout_seconds,
            scans.c.retries,
        )
        other = scans.alias("other")
        if self.dialect == "postgresql":
            higher_dispatched: ColumnElement[bool] = exists(
                select(other.c.id).where(
                    other.c.status == STATUS_QUEUED,
                    other.c.dispatched_at.is_not(None),
                    other.c.priority > scans.c.priority,
                )
            )
        else:
            # The partial index by name: without statistics SQLite would read every
            # queued row through (status, created_at).
            higher_dispatched = literal_column(
                f"EXISTS (SELECT 1 FROM {_SQLITE_IN_FLIGHT} AND other.priority > scans.priority)",
                Boolean(),
            )
        self._start_stmt: Update = (
            update(scans)
            .where(scans.c.id == bindparam("scan_id"), *dispatched, ~higher_dispatched)
            .values(**start_values)
            .returning(*returned)
        )
        if self.dialect != "postgresql":
            # SQLite: the swap is a write transaction of these (see _swap_sqlite).
            self._start_one_stmt = (
                update(scans)
                .where(scans.c.id == bindparam("scan_id"), *dispatched)
                .values(**start_values)
                .returning(*returned)
            )
            self._release_stmt = (
                update(scans)
                .where(scans.c.id == bindparam("scan_id"), *dispatched)
                .values(dispatched_at=None)
            )
            self._better_stmt = text(
                "SELECT own.id, (SELECT other.id FROM"
                f" {_SQLITE_IN_FLIGHT} AND other.priority > own.priority"
                " ORDER BY other.priority DESC, other.created_at, other.id LIMIT 1) AS better"
                " FROM scans AS own WHERE own.id = :scan_id AND own.status = 'queued'"
                " AND own.dispatched_at IS NOT NULL"
            )
            return
        # PostgreSQL: the swap in one statement.  The own row is locked first (a
        # duplicate message waits, then finds it running and starts nothing); the
        # better one is taken with SKIP LOCKED, so two workers never pick the same
        # one and never wait on each other.
        own = (
            select(scans.c.id, scans.c.priority)
            .where(scans.c.id == bindparam("scan_id"), *dispatched)
            .with_for_update(key_share=True)
            .cte("own")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        better = (
            select(other.c.id)
            .where(
                other.c.status == STATUS_QUEUED,
                other.c.dispatched_at.is_not(None),
                other.c.priority > select(own.c.priority).scalar_subquery(),
            )
            .order_by(other.c.priority.desc(), other.c.created_at, other.c.id)
            .limit(1)
            .with_for_update(key_share=True, skip_locked=True, of=other)
            .cte("better")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        released = (
            update(scans)
            .where(scans.c.id == own.c.id, *dispatched, exists(select(better.c.id)))
            .values(dispatched_at=null())
            .returning(scans.c.id)
            .cte("released")
        )
        target = func.coalesce(
            select(better.c.id).scalar_subquery(), select(own.c.id).scalar_subquery()
        )
        self._start_swap_stmt = (
            update(scans)
            .where(scans.c.id == target, *dispatched)
            .values(**start_values)
            .returning(*returned)
            .add_cte(released)
        )

    # -- the worker -------------------------------------------------------------------

    def start_run(
        self, scan_id: str, worker_id: str, *, successor: SuccessorWindow | None = None
    ) -> StartedRun | None:
        """CAS ``queued → running`` for the message of ``scan_id``; None when that scan is
        not queued and dispatched (a duplicate or stale message).

        The run started may be another scan's (see :meth:`_build_start_statements`):
        ``StartedRun.scan_id`` says which.

        With ``successor`` (PostgreSQL; ignored on SQLite) the start of the own scan
        also claims, in the same statement, the scan a bridge's claim would take next
        (``StartedRun.successor_id``), so that the window stays full without a bridge
        round: see :func:`_start_with_successor` for when it does.
        """
        values: dict[str, Any] = {"scan_id": scan_id, "start_worker": worker_id}
        if successor is not None and self._direct is not None:
            values.update(
                window=successor.fixed,
                min_window=successor.minimum,
                per_slot=successor.per_slot,
                stale_s=successor.stale_after_s,
            )
            row = self._returning_row(self._start_stmt, "_direct_start_successor", values)
        else:
            row = self._returning_row(self._start_stmt, "_direct_start", values)
        if row is None:
            if self.dialect == "postgresql":
                row = self._returning_row(self._start_swap_stmt, "_direct_start_swap", values)
            else:
                row = self._swap_sqlite(values)
        if row is None:
            return None
        return StartedRun(
            scan_id=row["id"],
            attempt=row["attempts"],
            providers_raw=row["providers_scanned"],
            frameworks_raw=row["frameworks_scanned"],
            triggered_by_user=row["triggered_by_user"],
            triggered_by_token=row["triggered_by_token"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            timeout_seconds=row["timeout_seconds"],
            retries=row["retries"] or 0,
            successor_id=row.get("successor_id"),
        )

    def _returning_row(self, statement: Executable, direct: str, values: dict[str, Any]) -> Any:
        """One statement's first row as a mapping, or None (on PostgreSQL through the
        held connection's ``direct`` statement)."""
        if self._direct is not None:
            row, _ = self._run_direct(getattr(self, direct), values)
            return row
        with self._tx(single=True) as conn:
            found = conn.execute(statement, values).first()
        return None if found is None else found._mapping

    def _swap_sqlite(self, values: dict[str, Any]) -> Any:
        """The swap on SQLite: one write transaction (BEGIN IMMEDIATE; the SQL argument
        is PostgreSQL's only), so nothing moves between the look and the writes."""
        with self._locked_tx("SELECT 1", {}) as conn:
            own = conn.execute(self._better_stmt, values).first()
            if own is None:
                return None
            target = values
            if own.better is not None:
                conn.execute(self._release_stmt, values)
                target = {**values, "scan_id": own.better}
            found = conn.execute(self._start_one_stmt, target).first()
        return None if found is None else found._mapping

    def heartbeat(self, scan_id: str, attempt: int, *, worker_id: str | None = None) -> bool:
        """Renew the lease of run ``attempt``; False once it is no longer ours."""
        values = {"scan_id": scan_id, "attempt": attempt, "run_worker": worker_id}
        if self._direct is not None:
            _, rowcount = self._run_direct(self._direct_heartbeat, values)
            return rowcount == 1
        with self._tx(single=True) as conn:
            result = conn.execute(self._heartbeat_stmt, values)
        return result.rowcount == 1

    def status_of(self, scan_id: str) -> tuple[str, int] | None:
        found = self._returning_row(self._status_stmt, "_direct_status", {"scan_id": scan_id})
        return None if found is None else (found["status"], found["attempts"])

    def finish_run(
        self,
        scan_id: str,
        attempt: int,
        status: str,
        *,
        error: str | None = None,
        findings_count: int | None = None,
        worker_id: str | None = None,
    ) -> FinishedRun | None:
        """CAS ``running(attempt) → status``; None if the run no longer owns the scan."""
        assert status in FINISHED_STATUSES, status
        params = {
            "scan_id": scan_id,
            "attempt": attempt,
            "run_worker": worker_id,
            "new_status": status,
            "error": None if error is None else error[:MAX_ERROR_CHARS],
            "findings_count": findings_count,
        }
        found = self._returning_row(self._finish_stmt, "_direct_finish", params)
        return None if found is None else FinishedRun.from_mapping(found)

    def retry_run(
        self,
        scan_id: str,
        attempt: int,
        *,
        error: str,
        delay_s: float,
        worker_id: str | None = None,
    ) -> RetriedRun | None:
        """CAS ``running(attempt) → queued`` with ``retries + 1`` and ``run_after = now +
        delay_s`` (a runner failure with retries left); None if the run no longer owns
        the scan.  The attempt stays spent: ``attempts`` counts runs started."""
        params = {
            "scan_id": scan_id,
            "attempt": attempt,
            "run_worker": worker_id,
            "error": error[:MAX_ERROR_CHARS],
            "delay_s": max(0.0, float(delay_s)),
        }
        row = self._returning_row(self._retry_stmt, "_direct_retry", params)
        if row is None:
            return None
        run_after = row["run_after"]
        if isinstance(run_after, str):  # SQLite hands the function's text back as it is
            run_after = UTCDateTime().process_result_value(run_after, self.engine.dialect)
        return RetriedRun(run_after=run_after, retries=row["retries"])

    def hand_back_run(self, scan_id: str, attempt: int, worker_id: str | None = None) -> bool:
        """CAS ``running(attempt) → queued`` for a run told to stop while its lease was
        in doubt: its outcome is void and the scan runs again (the attempt stays spent,
        like a lost worker's).  False when the run no longer owns the scan."""
        values = {"scan_id": scan_id, "attempt": attempt, "run_worker": worker_id}
        if self._direct is not None:
            _, rowcount = self._run_direct(self._direct_hand_back_run, values)
            return rowcount == 1
        with self._tx(single=True) as conn:
            result = conn.execute(self._hand_back_run_stmt, values)
        return result.rowcount == 1

    def hand_back(self, owner: str) -> list[str]:
        """Re-queue the running scans of ``owner``'s pool processes (a worker shutting down).

        A graceful hand-back spends no crash budget: the attempt is given back, and
        the worker id is cleared so that a straggler of the interrupted run can no
        longer renew or finish (see ``this_run``).
        """
        prefix = owner + "/"
        with self._tx(single=True) as conn:
            rows = conn.execute(
                update(scans)
                .where(
                    scans.c.status == STATUS_RUNNING,
                    func.substr(scans.c.worker_id, 1, len(prefix)) == prefix,
                )
                .values(
                    status=STATUS_QUEUED,
                    dispatched_at=None,
                    heartbeat_at=None,
                    worker_id=None,
                    attempts=case((scans.c.attempts > 0, scans.c.attempts - 1), else_=0),
                )
                .returning(scans.c.id)
            ).all()
        return [r.id for r in rows]

    # -- the reaper ------------------------------------------------------------------

    def reap_orphans(self, lease_s: float, max_attempts: int) -> list[ReapedScan]:
        """Running scans whose heartbeat is older than the lease: re-queue or fail them.

        The crash budget counts runs lost, not runs retried: ``attempts - retries``
        (this run included) against ``max_attempts``.
        """
        lost_runs = scans.c.attempts - scans.c.retries
        stale = and_(
            scans.c.status == STATUS_RUNNING,
            or_(
                scans.c.heartbeat_at < db_now_minus(self.dialect, lease_s),
                and_(
                    scans.c.heartbeat_at.is_(None),
                    func.coalesce(scans.c.started_at, scans.c.created_at)
                    < db_now_minus(self.dialect, lease_s),
                ),
            ),
        )
        reaped: list[ReapedScan] = []
        with self._tx() as conn:
            for row in conn.execute(
                update(scans)
                .where(stale, lost_runs < max_attempts)
                .values(
                    status=STATUS_QUEUED,
                    dispatched_at=None,
                    heartbeat_at=None,
                    worker_id=None,
                )
                .returning(scans.c.id, scans.c.attempts)
            ).all():
                reaped.append(ReapedScan(row.id, row.attempts, requeued=True))
            for row in conn.execute(
                update(scans)
                .where(stale, lost_runs >= max_attempts)
                .values(
                    status=STATUS_FAILED,
                    finished_at=self._now,
                    error=(
                        f"worker lost: no heartbeat for {lease_s:g}s on the last of"
                        f" {max_attempts} attempts"
                    ),
                )
                .returning(scans.c.id, scans.c.attempts)
            ).all():
                reaped.append(ReapedScan(row.id, row.attempts, requeued=False))
        return reaped


# The start of the own scan (the plain start statement, as compiled for the driver)
# and, in the same statement, the claim of its successor: the first row of the claim
# order (priority, age, id) that may run now, as a bridge's claim would take it.
# Only when that claim needs none of the claim statement's judgement (claim_sql.py):
# no pause, no per-key limit (the caller passes none for a default limit), the row
# already taken in (seen_at: keyed, its scan.queued sent), and the window's in-flight
# count, read before this start, within the window.  A start takes one scan out of
# the window and the successor puts one in, so the count never moves and needs no
# lock: the bridges' claims, serialized, see the same count before and after.  The
# row is taken with SKIP LOCKED, so two starts never pick the same one; whichever
# rows a start passes over, the bridge claims as before.
_SUCCESSOR_SQL = """
WITH started AS ({start}),
top AS MATERIALIZED (
    SELECT s.id, s.seen_at FROM scans s
    WHERE s.status = 'queued' AND s.dispatched_at IS NULL
      AND (s.run_after IS NULL OR s.run_after <= clock_timestamp())
      AND EXISTS (SELECT 1 FROM started)
      AND NOT EXISTS (SELECT 1 FROM scanqueue_pauses)
      AND NOT EXISTS (SELECT 1 FROM scanqueue_limits)
      AND (SELECT count(*) FROM scans f WHERE f.status = 'queued'
                                          AND f.dispatched_at IS NOT NULL)
          <= CASE WHEN %(window)s::integer > 0 THEN %(window)s::integer
                ELSE greatest(%(min_window)s::integer,
                %(per_slot)s::integer * (SELECT coalesce(sum(w.slots), 0) FROM scanqueue_workers w
                  WHERE w.heartbeat_at >= clock_timestamp()
                                          - make_interval(secs => %(stale_s)s::float8))) END
    ORDER BY s.priority DESC, s.created_at, s.id
    LIMIT 1
    FOR UPDATE OF s SKIP LOCKED),
successor AS (
    UPDATE scans s SET dispatched_at = clock_timestamp(), dispatch_count = s.dispatch_count + 1
    FROM top WHERE s.id = top.id AND top.seen_at IS NOT NULL
    RETURNING s.id)
SELECT started.*, (SELECT id FROM successor) AS successor_id FROM started
"""


def _start_with_successor(start: DirectStatement) -> DirectStatement:
    sql = _SUCCESSOR_SQL.format(start=start.sql)
    made = DirectStatement.from_sql(sql, PreparedForm.of(sql, start.defaults))
    made.defaults = dict(start.defaults)
    return made
