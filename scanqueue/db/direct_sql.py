"""The per-scan statements on PostgreSQL, run without SQLAlchemy's per-call work.

A scan costs two statements (start and finish) and a heartbeat every few
seconds.  Through a pooled SQLAlchemy ``Connection`` a pair cost 1.6 ms of CPU
here; run as below, 0.3-0.5 ms (``bench/micro.py``; the old Go pool's two plain
psycopg2 statements: 0.2 ms).  The
statements are still built with SQLAlchemy Core, once, and compiled to the
driver's SQL once; each thread keeps one DB-API connection of the store's
autocommit engine for as long as it works, so a call is one cursor execute.

Any driver error drops that thread's connection (invalidated in the pool), so
the next call starts on a fresh one, and is raised as SQLAlchemy would raise
it: the store's error mapping applies unchanged.

On PostgreSQL each statement is also prepared on the server, once per held
connection (``PREPARE``, then ``EXECUTE``): planning these statements on the
index-rich ``scans`` table cost more than running them (start 0.14 ms planning
against 0.09 ms execution, finish 0.09 against 0.08; ``pg_stat_statements``
during ``bench.ablation``).  A statement the server will not prepare runs
unprepared from then on; a connection that loses its prepared statements
(``DISCARD ALL``, a transaction-pooling proxy such as PgBouncer handing the
session's statements to another server connection) prepares again, and after
:data:`MAX_PREPARE_MISSES` such losses runs that connection unprepared.

Every statement has a client-side deadline (``deadline_s``): a database that
accepts bytes and never answers (a stalled proxy, a half-open socket whose
peer's kernel still acknowledges) would otherwise hold the caller for ever,
since libpq waits in ``poll()`` without a timeout and ``tcp_user_timeout`` only
covers unacknowledged bytes.  One daemon thread per process (:class:`_Deadlines`)
shuts the socket down when a deadline passes: libpq's wait returns at once, the
statement fails as a lost connection and the connection is dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.expression import ClauseElement

log = logging.getLogger(__name__)

# Longest a statement on a held connection may take, from send to last row.  The
# server's own statement_timeout (60 s) is longer; this one also covers a server
# that never answers at all.
DEFAULT_DEADLINE_S = 10.0

# Times a held connection may find its prepared statements gone (a proxy moved the
# session) before it stops preparing (each loss costs the call a second statement).
MAX_PREPARE_MISSES = 3
# SQLSTATEs: the prepared statement is not there / already there.
_PG_NO_SUCH_STATEMENT = "26000"
_PG_DUPLICATE_STATEMENT = "42P05"

# Connections a forked child inherited: the parent still uses their sockets, so
# the child keeps them referenced and never closes one.
_inherited: list[Any] = []


class DirectStatement:
    """One statement, compiled once for ``engine``'s dialect (and, on PostgreSQL, its
    ``PREPARE`` and ``EXECUTE`` forms)."""

    def __init__(self, statement: ClauseElement, engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        # Values the statement carries itself (literal statuses, + 1, ...).
        self.defaults: dict[str, Any] = dict(compiled.params)
        self.prepared: PreparedForm | None = (
            PreparedForm.of(self.sql, self.defaults)
            if engine.dialect.name == "postgresql"
            else None
        )

    @classmethod
    def from_sql(cls, sql: str, prepared: PreparedForm | None) -> DirectStatement:
        """A statement written for the driver (``%(name)s`` placeholders), with its
        prepared form made by the caller (or None)."""
        made = cls.__new__(cls)
        made.sql = sql
        made.defaults = {}
        made.prepared = prepared
        return made

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **values}


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


class PreparedForm:
    """A pyformat statement as ``PREPARE name AS …$n…`` and ``EXECUTE name (%(a)s, …)``.

    The statement's own constants (its defaults that are not None: literal statuses,
    ``+ 1``) are written into the prepared SQL, not passed: a generic plan then still
    matches the partial indexes (``WHERE status = 'queued' …``), which a parameter
    cannot.  A call that gives one of them another value runs unprepared
    (:meth:`usable_for`).  The name is a digest of the prepared SQL, so a
    connection that already holds it (given back to the pool by another holder)
    holds this very statement.  The server infers the parameters' types from their
    use.
    """

    def __init__(
        self,
        name: str,
        prepare_sql: str,
        execute_sql: str,
        inlined: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.prepare_sql = prepare_sql
        self.execute_sql = execute_sql
        self.inlined = dict(inlined or {})

    @classmethod
    def of(cls, sql: str, defaults: Mapping[str, Any]) -> PreparedForm:
        inlined = {k: v for k, v in defaults.items() if _inlinable(v)}
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            key = match.group(1)
            if key in inlined:
                return _sql_literal(inlined[key])
            if key not in order:
                order.append(key)
            return f"${order.index(key) + 1}"

        body = _PLACEHOLDER.sub(number, sql).replace("%%", "%")
        name = "scanqueue_" + hashlib.sha256(body.encode()).hexdigest()[:16]
        args = f" ({', '.join(f'%({n})s' for n in order)})" if order else ""
        return cls(name, f"PREPARE {name} AS {body}", f"EXECUTE {name}{args}", inlined)

    def usable_for(self, values: Mapping[str, Any]) -> bool:
        """False when ``values`` change a constant written into the prepared SQL."""
        inlined = self.inlined
        return not any(k in inlined and inlined[k] != v for k, v in values.items())


def _inlinable(value: Any) -> bool:
    return isinstance(value, bool | int | str) and (
        not isinstance(value, str) or value.isprintable()
    )


def _sql_literal(value: bool | int | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


class HeldConnections:
    """One DB-API connection per thread, checked out of ``engine`` and kept."""

    def __init__(
        self, engine: Engine, recycle_s: float = 1800.0, deadline_s: float = DEFAULT_DEADLINE_S
    ) -> None:
        self._engine = engine
        self.recycle_s = recycle_s
        self.deadline_s = deadline_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: list[tuple[threading.Thread, Any]] = []

    def run(self, statement: DirectStatement, values: Mapping[str, Any]) -> tuple[Any, int]:
        """Execute; return (the first row as a name → value dict or None, rowcount)."""
        rows, rowcount = self._run(statement, values, every_row=False)
        return (rows[0] if rows else None), rowcount

    def run_rows(self, statement: DirectStatement, values: Mapping[str, Any]) -> list[Any]:
        """Execute; return every row, each as a name → value dict."""
        return self._run(statement, values, every_row=True)[0]

    def _run(
        self, statement: DirectStatement, values: Mapping[str, Any], *, every_row: bool
    ) -> tuple[list[Any], int]:
        params = statement.params(values)
        dbapi = self._engine.dialect.loaded_dbapi
        conn = None
        armed: int | None = None
        expired = False
        try:
            conn = self._connection()
            armed = deadlines().arm(conn.dbapi_connection.fileno(), self.deadline_s)
            cursor = conn.cursor()
            try:
                self._execute(cursor, statement, params, values)
                if cursor.description is None:
                    rows = []
                elif every_row:
                    rows = cursor.fetchall()
                else:
                    rows = cursor.fetchmany(1)
                names = [column[0] for column in cursor.description or ()]
                rowcount = cursor.rowcount
            finally:
                cursor.close()
                expired = armed is not None and deadlines().disarm(armed)
                armed = None
        except dbapi.Error as exc:
            if armed is not None:
                expired = deadlines().disarm(armed)
            if expired:
                log.warning(
                    "a statement on a held connection took over %gs (the database or the"
                    " network stalled); connection dropped",
                    self.deadline_s,
                )
            # No connection at all (the pool could not open one) counts as gone too.
            disconnect = conn is None or self._engine.dialect.is_disconnect(
                exc, conn.dbapi_connection, None
            )
            if conn is not None:
                self._drop(conn)
            raise sa_exc.DBAPIError.instance(
                statement.sql,
                params,
                exc,
                dbapi.Error,
                hide_parameters=True,  # a parameter may be a token or an error text
                connection_invalidated=disconnect,
                dialect=self._engine.dialect,
            ) from exc
        if expired and conn is not None:
            # The socket was shut down just as the answer came: the result stands, the
            # connection does not.
            self._drop(conn)
        return [
            {name: _utc(value) for name, value in zip(names, row, strict=True)} for row in rows
        ], rowcount

    def _execute(
        self,
        cursor: Any,
        statement: DirectStatement,
        params: dict[str, Any],
        values: Mapping[str, Any],
    ) -> None:
        """The statement, prepared on this connection where it can be."""
        form = statement.prepared
        local = self._local
        if form is None or local.misses >= MAX_PREPARE_MISSES or not form.usable_for(values):
            cursor.execute(statement.sql, params)
            return
        if form.name not in local.prepared:
            try:
                cursor.execute(form.prepare_sql)
            except self._engine.dialect.loaded_dbapi.Error as exc:
                code = getattr(exc, "pgcode", None) or ""
                if code != _PG_DUPLICATE_STATEMENT:
                    if not code.startswith("42"):
                        raise  # the connection or the server, not the statement
                    # Raises when the statement itself is wrong (no schema yet, say).
                    cursor.execute(statement.sql, params)
                    # It runs, but the server cannot prepare it (a type it cannot
                    # infer): plain from now on.
                    log.info("statement runs unprepared: %s", _describe(exc))
                    statement.prepared = None
                    return
            local.prepared.add(form.name)
        try:
            cursor.execute(form.execute_sql, params)
        except self._engine.dialect.loaded_dbapi.Error as exc:
            if getattr(exc, "pgcode", None) != _PG_NO_SUCH_STATEMENT:
                raise
            # Gone from the session: prepare again next time, run it plain this time.
            local.prepared.clear()
            local.misses += 1
            if local.misses >= MAX_PREPARE_MISSES:
                log.warning(
                    "prepared statements keep disappearing from a database session (a"
                    " transaction-pooling proxy?); this connection runs them unprepared"
                )
            cursor.execute(statement.sql, params)

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.since > self.recycle_s:
            # Like the pool's own recycling: a connection idle for long may have been
            # cut by a firewall or the server; give it back and let the pool decide.
            self._give_back(conn)
            conn = None
        if conn is None:
            conn = self._engine.raw_connection()
            self._local.conn = conn
            self._local.since = time.monotonic()
            # Names prepared on this connection by this holder (one already there is
            # found by PREPARE's duplicate error).
            self._local.prepared = set()
            self._local.misses = 0
            with self._lock:
                # Give back what threads that have ended were holding.
                for thread, old in [held for held in self._held if not held[0].is_alive()]:
                    self._held.remove((thread, old))
                    old.close()
                self._held.append((threading.current_thread(), conn))
        return conn

    def _drop(self, conn: Any) -> None:
        self._forget(conn)
        conn.invalidate()  # the pool closes it, ignoring errors from a dead socket

    def _give_back(self, conn: Any) -> None:
        self._forget(conn)
        conn.close()

    def _forget(self, conn: Any) -> None:
        self._local.conn = None
        with self._lock:
            self._held = [held for held in self._held if held[1] is not conn]

    def dispose(self, close: bool = True) -> None:
        """Give every held connection back (``close=False`` after a fork: keep them)."""
        with self._lock:
            held, self._held = self._held, []
        self._local = threading.local()
        for _, conn in held:
            if close:
                conn.close()
            else:
                _inherited.append(conn)


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _utc(value: Any) -> Any:
    # As the store's UTCDateTime type returns timestamps: aware, in UTC.
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


class _Deadlines:
    """One daemon thread that shuts down the socket of a statement past its deadline.

    ``arm`` and ``disarm`` cost a lock each; the thread sleeps until the earliest
    deadline.  Shutting a socket down (not closing its descriptor) is safe from
    another thread: libpq still owns and closes the descriptor, and ``disarm``
    under the same lock guarantees a descriptor is never touched after its
    statement returned (so never after it could be reused).
    """

    MAX_WAIT_S = 60.0

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (deadline, fd)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"scanqueue-deadlines-{self.pid}", daemon=True
                )
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Forget a statement; True if its deadline had passed (its socket is shut)."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, fd) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        self._fired.add(token)
                        _shut(fd)
                nearest = min((d for d, _ in self._armed.values()), default=math.inf)
                self._wake_at = min(nearest, now + self.MAX_WAIT_S)
                self._cond.wait(max(0.0, self._wake_at - now))


def _shut(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()  # closes the duplicate only


_deadlines: _Deadlines | None = None
_deadlines_lock = threading.Lock()


def deadlines() -> _Deadlines:
    """This process's deadline thread (a forked child gets its own)."""
    global _deadlines
    found = _deadlines
    if found is not None and found.pid == os.getpid():
        return found
    with _deadlines_lock:
        if _deadlines is None or _deadlines.pid != os.getpid():
            _deadlines = _Deadlines()
        return _deadlines


def _after_fork_in_child() -> None:
    global _deadlines, _deadlines_lock
    _deadlines_lock = threading.Lock()
    _deadlines = None


os.register_at_fork(after_in_child=_after_fork_in_child)
