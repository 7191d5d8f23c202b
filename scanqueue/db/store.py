"""Every SQL statement scanqueue runs against ``scans``, and the engine that runs them.

Each state change is one compare-and-set statement keyed on
``(id, status[, attempts])``, so a duplicate message, a zombie run, the reaper
and a cancel can race freely: exactly one of them wins each transition.

    queued ──start_run──▶ running ──finish_run──▶ completed | failed
      ▲  │                  │ │
      │  └────cancel────────┼─┴──cancel──▶ canceled
      └──reap (attempts < max)   reap (attempts ≥ max) ──▶ failed

Driver errors that mean "the database is not there" become
:class:`UnavailableError` here and nowhere else.  Engines are per process
(:func:`store_for`), because Celery's prefork pool forks after start.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Row,
    Text,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement

from scanqueue.config import mask_url
from scanqueue.db.direct_sql import DirectStatement, HeldConnections
from scanqueue.db.schema import (
    FINISHED_STATUSES,
    STATUS_CANCELED,
    STATUS_FAILED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    STATUSES,
    db_now,
    db_now_minus,
    db_now_plus,
    leader_lease,
    scans,
    workers,
)
from scanqueue.errors import ConflictError, NotFoundError, UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 60_000
PG_LOCK_TIMEOUT_MS = 10_000
PG_TCP_USER_TIMEOUT_MS = 10_000
MAX_ERROR_CHARS = 4000
# pg_advisory_xact_lock key that serializes dispatch claims across bridges (any
# constant; apart from scanqueue.db.migrate's).  Held for the claim's transaction
# only, and released with the connection when a bridge dies: no TTL to wait out.
DISPATCH_LOCK_KEY = 0x5CA9_D15B
# Re-send backoff: a scan waits older_than × 2^(dispatches - 1), capped at 64×.
REDISPATCH_BACKOFF_STEPS = 7

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
)


@dataclass(frozen=True)
class ScanRow:
    """A scan as users see it (CONTRACT §4): the contract columns, never the token."""

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

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"StartedRun(scan_id={self.scan_id!r}, attempt={self.attempt})"


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


def make_engine(database_url: str, *, pool: bool = True, autocommit: bool = False) -> Engine:
    """An engine with the connection settings scanqueue relies on.

    ``autocommit=True`` makes every connection autocommit for good; switching a
    pooled connection per checkout costs a round trip each way.
    """
    isolation = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
            poolclass=None if pool else NullPool,
            **isolation,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets the bridge, workers and the CLI read while one of them writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(
        database_url,
        # No pre-ping: it costs a round trip per statement. A connection that died is
        # reported as UnavailableError once (and the pool invalidated); every caller
        # retries or tolerates that, and recycling keeps idle ones from going stale.
        pool_recycle=1800,
        pool_size=5,
        max_overflow=5,
        poolclass=None if pool else NullPool,
        **isolation,
        connect_args={
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "application_name": "scanqueue",
            # A half-open connection would otherwise hang a statement for the kernel's
            # two-hour default: keepalives find an idle one, and tcp_user_timeout ends
            # one whose sent bytes go unacknowledged.  (A peer that acknowledges and
            # never answers is bounded by the held connections' client-side deadline.)
            "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            # No statement waits for ever: a row locked by someone's forgotten
            # transaction costs a retry, not a stuck worker or bridge.
            "options": f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}"
            f" -c lock_timeout={PG_LOCK_TIMEOUT_MS}",
        },
    )


def describe_db_error(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()
    return first[0] if first else type(orig).__name__


class Store:
    """All statements against ``scans``; one instance per process and database."""

    def __init__(self, database_url: str, engine: Engine | None = None) -> None:
        self.database_url = database_url
        self.engine = engine or make_engine(database_url)
        self.dialect = self.engine.dialect.name
        self._now = db_now(self.dialect)
        # One statement, one round trip: single-statement calls skip BEGIN/COMMIT,
        # on connections of their own that always autocommit.
        self._autocommit_engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine is not None
            else make_engine(database_url, autocommit=True)
        )
        self._build_hot_statements()
        self._depth_cache: tuple[float, int] | None = None
        # PostgreSQL: the per-scan statements skip SQLAlchemy's per-call work.  Only
        # on this store's own autocommit engine (a given engine's connections do not
        # autocommit).
        self._direct: HeldConnections | None = None
        if self.dialect == "postgresql" and engine is None:
            self._direct = HeldConnections(self._autocommit_engine)
            self._direct_start = DirectStatement(self._start_stmt, self._autocommit_engine)
            self._direct_heartbeat = DirectStatement(self._heartbeat_stmt, self._autocommit_engine)
            self._direct_finish = DirectStatement(self._finish_stmt, self._autocommit_engine)
            # A run's other statements too, so that each has the client-side deadline
            # (a hand-back to a stalled database must not hold a pool process for ever).
            self._direct_status = DirectStatement(self._status_stmt, self._autocommit_engine)
            self._direct_hand_back_run = DirectStatement(
                self._hand_back_run_stmt, self._autocommit_engine
            )

    def _build_hot_statements(self) -> None:
        """The per-scan statements, built once (building them is most of their CPU cost)."""
        now = self._now
        self._start_stmt = (
            update(scans)
            .where(scans.c.id == bindparam("scan_id"), scans.c.status == STATUS_QUEUED)
            .values(
                status=STATUS_RUNNING,
                attempts=scans.c.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                finished_at=None,
                error=None,
                # A scan's findings are its last run's: a re-run starts from none.
                findings_count=0,
                worker_id=bindparam("worker_id"),
            )
            .returning(
                scans.c.id,
                scans.c.attempts,
                scans.c.providers_scanned,
                scans.c.frameworks_scanned,
                scans.c.triggered_by_user,
                scans.c.triggered_by_token,
                scans.c.created_at,
                scans.c.started_at,
            )
        )
        # A run is (scan, attempt, worker): a graceful hand-back gives its attempt
        # back (no crash budget spent), so the next run may reuse the number, and
        # only the worker id still tells a straggler of the old run from the new one.
        # A NULL worker id matches any (callers outside a worker, the tests).
        run_worker = bindparam("run_worker", value=None, type_=Text, required=False)
        this_run = (
            scans.c.id == bindparam("scan_id"),
            scans.c.status == STATUS_RUNNING,
            scans.c.attempts == bindparam("attempt"),
            or_(run_worker.is_(None), scans.c.worker_id == run_worker),
        )
        self._heartbeat_stmt = update(scans).where(*this_run).values(heartbeat_at=now)
        self._hand_back_run_stmt = (
            update(scans)
            .where(*this_run)
            .values(status=STATUS_QUEUED, dispatched_at=None, heartbeat_at=None, worker_id=None)
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
            .returning(*PUBLIC_COLUMNS)
        )
        self._status_stmt = select(scans.c.status, scans.c.attempts).where(
            scans.c.id == bindparam("scan_id")
        )
        # A materialized CTE, not ``IN (subquery)``: PostgreSQL may re-run a LIMIT
        # subquery per outer row and so claim more than ``limit`` rows.
        oldest = (
            select(scans.c.id)
            .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_(None))
            .order_by(scans.c.created_at, scans.c.id)
            .limit(bindparam("limit", type_=Integer))
            .with_for_update(skip_locked=True)
            .cte("oldest")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        self._claim_stmt = (
            update(scans)
            .where(scans.c.id == oldest.c.id, scans.c.status == STATUS_QUEUED)
            .values(dispatched_at=now, dispatch_count=scans.c.dispatch_count + 1)
            .returning(scans.c.id, scans.c.created_at)
        )

    def dispose(self, close: bool = True) -> None:
        """Drop both connection pools (``close=False`` after a fork: the parent owns them)."""
        if self._direct is not None:
            self._direct.dispose(close=close)
        self.engine.dispose(close=close)
        self._autocommit_engine.engine.dispose(close=close)

    @property
    def masked_url(self) -> str:
        return mask_url(self.database_url)

    @contextmanager
    def _tx(self, *, single: bool = False) -> Iterator[Connection]:
        """A transaction; ``single=True`` for one statement, which then autocommits."""
        try:
            if single:
                with self._autocommit_engine.connect() as conn:
                    yield conn
            else:
                with self.engine.begin() as conn:
                    yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            self._raise_unavailable_if_gone(exc)
            raise

    def _raise_unavailable_if_gone(self, exc: sa_exc.DBAPIError) -> None:
        if getattr(exc, "connection_invalidated", False) or _is_connect_error(exc):
            raise UnavailableError(
                f"cannot reach database {self.masked_url}: {describe_db_error(exc)}"
            ) from exc

    def _run_direct(self, statement: DirectStatement, values: dict[str, Any]) -> tuple[Any, int]:
        assert self._direct is not None
        try:
            return self._direct.run(statement, values)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            self._raise_unavailable_if_gone(exc)
            raise

    # -- health -----------------------------------------------------------------

    def ping(self) -> None:
        """Raise UnavailableError unless a trivial query succeeds."""
        with self._tx(single=True) as conn:
            conn.execute(select(1))

    def ping_schema(self) -> None:
        """Like :meth:`ping`, and the schema must exist (``scanqueue db upgrade`` ran)."""
        self.ping()
        if not self.has_schema():
            raise UnavailableError(
                f"database {self.masked_url} has no scans table yet (run `scanqueue db upgrade`)"
            )

    def wait_until_ready(self, timeout_s: float) -> None:
        """For long-running processes: retry :meth:`ping_schema` with backoff, logging
        each attempt, for up to ``timeout_s``; then raise one line saying so."""
        try:
            retry_with_backoff(self.ping_schema, timeout_s=timeout_s, what="the database")
        except UnavailableError as exc:
            raise UnavailableError(f"giving up after {timeout_s:g}s: {exc}") from None

    def has_schema(self) -> bool:
        from sqlalchemy import inspect

        with self._tx() as conn:
            return inspect(conn).has_table("scans")

    # -- producers and users ------------------------------------------------------

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

    # -- the bridge -----------------------------------------------------------------

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

    def claim_within_window(self, limit: int, window: int) -> tuple[list[str], int]:
        """Claim ``min(limit, window - in_flight)`` scans; returns (ids, room left).

        ``in_flight`` is the queued rows with ``dispatched_at`` set: handed to the
        broker, not started.  Count and claim must see the same state, so claims
        are serialized in the database — PostgreSQL: a transaction-scoped advisory
        lock (a few milliseconds per claim; a dead claimer's lock goes with its
        connection); SQLite: ``BEGIN IMMEDIATE`` takes the write lock before the
        count.  Every bridge may claim, and the window stays exact across them.
        """
        in_flight_stmt = (
            select(func.count())
            .select_from(scans)
            .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None))
        )
        # A look without the lock first: while the window is full (a saturated
        # backlog, looked at many times a second) no lock is taken at all.  Safe:
        # only claims (serialized) fill the window, so "full" can only be stale
        # towards "room", which the next look finds.
        with self._tx(single=True) as conn:
            if int(conn.execute(in_flight_stmt).scalar_one()) >= window:
                return [], 0
        with self._serialized_tx() as conn:
            in_flight = int(conn.execute(in_flight_stmt).scalar_one())
            take = max(0, min(limit, window - in_flight))
            rows = conn.execute(self._claim_stmt, {"limit": take}).all() if take else []
        return _oldest_first(rows), max(0, window - in_flight - len(rows))

    @contextmanager
    def _serialized_tx(self) -> Iterator[Connection]:
        """A transaction that holds the dispatch lock from its first statement."""
        if self.dialect == "postgresql":
            with self._tx() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": DISPATCH_LOCK_KEY})
                yield conn
            return
        try:
            # Autocommit connection: the driver issues no BEGIN of its own, so ours
            # can be IMMEDIATE (a deferred one would read, then fail to upgrade).
            with self._autocommit_engine.connect() as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            self._raise_unavailable_if_gone(exc)
            raise

    def in_flight(self) -> int:
        """Scans dispatched but not started (queued with ``dispatched_at`` set)."""
        with self._tx(single=True) as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(scans)
                    .where(scans.c.status == STATUS_QUEUED, scans.c.dispatched_at.is_not(None))
                ).scalar_one()
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

    # -- the worker -------------------------------------------------------------------

    def start_run(self, scan_id: str, worker_id: str) -> StartedRun | None:
        """CAS ``queued → running``; None when the scan is not queued (a duplicate)."""
        values = {"scan_id": scan_id, "worker_id": worker_id}
        row: Any
        if self._direct is not None:
            row, _ = self._run_direct(self._direct_start, values)
        else:
            with self._tx(single=True) as conn:
                found = conn.execute(self._start_stmt, values).first()
            row = None if found is None else found._mapping
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
        )

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
        if self._direct is not None:
            found, _ = self._run_direct(self._direct_status, {"scan_id": scan_id})
            return None if found is None else (found["status"], found["attempts"])
        with self._tx(single=True) as conn:
            row = conn.execute(self._status_stmt, {"scan_id": scan_id}).first()
        return None if row is None else (row.status, row.attempts)

    def finish_run(
        self,
        scan_id: str,
        attempt: int,
        status: str,
        *,
        error: str | None = None,
        findings_count: int | None = None,
        worker_id: str | None = None,
    ) -> ScanRow | None:
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
        if self._direct is not None:
            found, _ = self._run_direct(self._direct_finish, params)
            return None if found is None else ScanRow.from_mapping(found)
        with self._tx(single=True) as conn:
            row = conn.execute(self._finish_stmt, params).first()
        return None if row is None else ScanRow.from_row(row)

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
        """Running scans whose heartbeat is older than the lease: re-queue or fail them."""
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
                .where(stale, scans.c.attempts < max_attempts)
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
                .where(stale, scans.c.attempts >= max_attempts)
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

    # -- leadership without Redis ------------------------------------------------------

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder``; False if someone else holds it."""
        with self._tx() as conn:
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
            conn.execute(dialect_insert(leader_lease).values(name=name).on_conflict_do_nothing())
            result = conn.execute(
                update(leader_lease)
                .where(
                    leader_lease.c.name == name,
                    or_(
                        leader_lease.c.holder == holder,
                        leader_lease.c.holder.is_(None),
                        leader_lease.c.expires_at < self._now,
                    ),
                )
                .values(
                    holder=holder,
                    expires_at=db_now_plus(self.dialect, ttl_s),
                    epoch=leader_lease.c.epoch + 1,
                )
            )
        return result.rowcount == 1

    def release_lease(self, name: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute(
                update(leader_lease)
                .where(leader_lease.c.name == name, leader_lease.c.holder == holder)
                .values(holder=None, expires_at=None)
            )


def _oldest_first(rows: Sequence[Row[Any]]) -> list[str]:
    ordered = sorted(rows, key=lambda r: (r.created_at is None, r.created_at, r.id))
    return [r.id for r in ordered]


def _is_connect_error(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return any(
        marker in text
        for marker in (
            "could not connect",
            "connection refused",
            "server closed the connection",
            "terminating connection",
            "connection already closed",
            "could not translate host",
            "timeout expired",
            "no connection to the server",
            "connection to server",
            "unable to open database",
            "ssl connection has been closed",
            "the database system is",
        )
    )


def retry_with_backoff(
    attempt: Callable[[], T],
    *,
    timeout_s: float,
    what: str,
    first_delay_s: float = 0.5,
    max_delay_s: float = 5.0,
    stop: threading.Event | None = None,
) -> T:
    """Call ``attempt`` until it stops raising UnavailableError or ``timeout_s`` passes.

    Each failed attempt is logged (the message already masks passwords); the
    last error is re-raised when time is up.
    """
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except UnavailableError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                raise
            wait = min(delay, remaining)
            log.warning("waiting for %s (attempt %d, retry in %.1fs): %s", what, tries, wait, exc)
            if stop is not None:
                if stop.wait(wait):
                    raise
            else:
                time.sleep(wait)
            delay = min(delay * 2, max_delay_s)


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def store_for(database_url: str) -> Store:
    """This process's Store for ``database_url`` (rebuilt after a fork)."""
    key = (os.getpid(), database_url)
    with _stores_lock:
        found = _stores.get(key)
        if found is None:
            for stale in [k for k in _stores if k[0] != key[0]]:
                # Inherited from the parent: drop the pool without closing its sockets,
                # which still belong to the parent.
                _stores.pop(stale).dispose(close=False)
            found = _stores[key] = Store(database_url)
        return found
