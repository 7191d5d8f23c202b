"""Engines, the error boundary, and the base every part of the store builds on.

Owns :func:`make_engine` (the connection settings scanqueue relies on), the
mapping of driver errors that mean "the database is not there" to
:class:`UnavailableError` (here and nowhere else), :func:`retry_with_backoff`,
and :class:`StoreBase`: the engines, the dialect, the transaction helper
``_tx`` and the health checks that the store's rooms (``scans``, ``claims``,
``runs``, ``leases``) share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from scanqueue.config import mask_url
from scanqueue.db.direct_sql import DirectStatement, HeldConnections
from scanqueue.db.fork_gate import GATE as FORK_GATE
from scanqueue.db.schema import db_now
from scanqueue.errors import UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 60_000
PG_LOCK_TIMEOUT_MS = 10_000
PG_TCP_USER_TIMEOUT_MS = 10_000


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
        # NullPool takes no size: passing one makes create_engine raise TypeError.
        **({"pool_size": 5, "max_overflow": 5} if pool else {"poolclass": NullPool}),
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


class StoreBase:
    """The engines and the transaction helper that every room of the store uses."""

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
        # PostgreSQL: the per-scan statements skip SQLAlchemy's per-call work.  Only
        # on this store's own autocommit engine (a given engine's connections do not
        # autocommit).
        self._direct: HeldConnections | None = None
        if self.dialect == "postgresql" and engine is None:
            self._direct = HeldConnections(self._autocommit_engine)
        # SQLite: no fork of this process while a transaction runs
        # (:mod:`scanqueue.db.fork_gate`).
        self._fork_gate: Callable[[], AbstractContextManager[None]] = (
            FORK_GATE.held if self.dialect == "sqlite" else nullcontext
        )

    def dispose(self, close: bool = True) -> None:
        """Drop both connection pools (``close=False`` after a fork: the parent owns them).

        SQLite: inside the fork gate, like every other use of a connection; a fork
        during ``sqlite3_close`` would leave the child waiting for ever on SQLite's
        process-wide VFS mutex (:mod:`scanqueue.db.fork_gate`)."""
        with self._fork_gate():
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
            with self._fork_gate():
                if single:
                    with self._autocommit_engine.connect() as conn:
                        yield conn
                else:
                    with self.engine.begin() as conn:
                        yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            self._raise_unavailable_if_gone(exc)
            raise

    @contextmanager
    def _locked_tx(self, pg_lock_sql: str, params: Mapping[str, Any]) -> Iterator[Connection]:
        """A transaction that holds a lock from its first statement.

        PostgreSQL: the advisory lock that ``pg_lock_sql`` takes (a
        ``pg_advisory_xact_lock``, released at commit, and with the connection if
        the process dies).  SQLite: the database's write lock, ``BEGIN IMMEDIATE``
        (a deferred BEGIN would read, then fail to upgrade), which serializes
        every writer anyway.
        """
        if self.dialect == "postgresql":
            with self._tx() as conn:
                conn.execute(text(pg_lock_sql), dict(params))
                yield conn
            return
        try:
            # Autocommit connection: the driver issues no BEGIN of its own.
            with self._fork_gate(), self._autocommit_engine.connect() as conn:
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

    def _raise_unavailable_if_gone(self, exc: sa_exc.DBAPIError) -> None:
        if getattr(exc, "connection_invalidated", False) or _is_connect_error(exc):
            raise UnavailableError(
                f"cannot reach database {self.masked_url}: {describe_db_error(exc)}"
            ) from exc

    def _run_direct(self, statement: DirectStatement, values: dict[str, Any]) -> tuple[Any, int]:
        """The first row (or None) and the row count, on this thread's held connection."""
        direct = self._direct
        assert direct is not None
        return self._mapped(lambda: direct.run(statement, values))

    def _run_direct_rows(self, statement: DirectStatement, values: dict[str, Any]) -> list[Any]:
        """Every row, on this thread's held connection."""
        direct = self._direct
        assert direct is not None
        return self._mapped(lambda: direct.run_rows(statement, values))

    def _mapped(self, call: Callable[[], T]) -> T:
        """``call()``, a lost connection raised as UnavailableError."""
        try:
            return call()
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
