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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.expression import ClauseElement

# Connections a forked child inherited: the parent still uses their sockets, so
# the child keeps them referenced and never closes one.
_inherited: list[Any] = []


class DirectStatement:
    """One statement, compiled once for ``engine``'s dialect."""

    def __init__(self, statement: ClauseElement, engine: Engine) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        # Values the statement carries itself (literal statuses, + 1, ...).
        self.defaults: dict[str, Any] = dict(compiled.params)

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **values}


class HeldConnections:
    """One DB-API connection per thread, checked out of ``engine`` and kept."""

    def __init__(self, engine: Engine, recycle_s: float = 1800.0) -> None:
        self._engine = engine
        self.recycle_s = recycle_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: list[tuple[threading.Thread, Any]] = []

    def run(self, statement: DirectStatement, values: Mapping[str, Any]) -> tuple[Any, int]:
        """Execute; return (the first row as a name → value dict or None, rowcount)."""
        params = statement.params(values)
        dbapi = self._engine.dialect.loaded_dbapi
        conn = None
        try:
            conn = self._connection()
            cursor = conn.cursor()
            try:
                cursor.execute(statement.sql, params)
                row = cursor.fetchone() if cursor.description else None
                names = [column[0] for column in cursor.description or ()]
                rowcount = cursor.rowcount
            finally:
                cursor.close()
        except dbapi.Error as exc:
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
        if row is None:
            return None, rowcount
        return {name: _utc(value) for name, value in zip(names, row, strict=True)}, rowcount

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


def _utc(value: Any) -> Any:
    # As the store's UTCDateTime type returns timestamps: aware, in UTC.
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value
