"""Whether another connection committed to an SQLite file: the cross-process wake-up.

On SQLite nothing notifies a waiting process of another's commit, and the embedded
broker's consumer and a standalone bridge would otherwise sleep out their whole
poll interval after every commit that concerns them (a standalone bridge's
publish; a worker's start freeing room in the dispatch window; another program's
insert).  :class:`CommitWatch` asks SQLite itself, through ``PRAGMA data_version``
— documented to change exactly when another connection has committed to the file —
on a connection of its own.  Its :meth:`CommitWatch.wait` looks every
:data:`MIN_LOOK_EVERY_S` after a commit was seen, backing off to
:data:`MAX_LOOK_EVERY_S` while none comes: 25 looks a second when idle, each
0.1–0.25 ms of CPU with the timed wake-up around it (about 0.5 % of a core; at
10 ms it was 2.5 %), and on average 20 ms before an idle bridge sees an insert.

A file that cannot be watched (an in-memory database, an error opening it) reports
no change: the caller keeps to its poll, which stays the guarantee.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from time import monotonic

from sqlalchemy import make_url

from scanqueue.db.fork_gate import GATE as FORK_GATE

MIN_LOOK_EVERY_S = 0.005
MAX_LOOK_EVERY_S = 0.04


class CommitWatch:
    """Commits by other connections to one SQLite file, since :meth:`mark`."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._pid = 0
        self._conn: sqlite3.Connection | None = None
        self._seen: int | None = None
        self._every = MIN_LOOK_EVERY_S

    @classmethod
    def of_url(cls, url: str) -> CommitWatch:
        """For a SQLAlchemy SQLite URL; anything else watches nothing."""
        try:
            parsed = make_url(url)
        except Exception:  # not a URL SQLAlchemy reads: nothing to watch
            return cls(None)
        if parsed.get_backend_name() != "sqlite":
            return cls(None)
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return cls(None)
        return cls(database)

    def mark(self) -> None:
        """Remember the file's version now (before looking at what it holds)."""
        self._seen = self._version()

    def changed(self) -> bool:
        """True when another connection committed since :meth:`mark`."""
        if self._seen is None:
            return False
        return self._version() != self._seen

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Up to ``seconds``; True as soon as ``event`` is set or another connection
        commits (since :meth:`mark`), False when the time ran out."""
        if self.path is None or self._seen is None:
            return event.wait(seconds)
        until = monotonic() + seconds
        while True:
            left = until - monotonic()
            if left <= 0:
                return False
            if event.wait(min(left, self._every)):
                return True
            if self.changed():
                self._every = MIN_LOOK_EVERY_S
                return True
            self._every = min(self._every * 2, MAX_LOOK_EVERY_S)

    def _version(self) -> int | None:
        if self.path is None:
            return None
        with FORK_GATE.held():
            try:
                return self._read_version(self.path)
            except sqlite3.Error:
                self._close()
                return None

    def _read_version(self, path: str) -> int | None:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                # A forked child never uses, nor closes, its parent's connection.
                _inherited.append(self._conn)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._pid = os.getpid()
        row = self._conn.execute("PRAGMA data_version").fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        with FORK_GATE.held():
            self._close()

    def _close(self) -> None:
        """Inside the fork gate: ``sqlite3_close`` takes SQLite's process-wide VFS
        mutex, which a fork in the middle of it would leave held in the child for
        good (its first open of any file would then wait for ever)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        elif self._conn is not None:
            _inherited.append(self._conn)
        self._conn = None


# Connections a forked child inherited: kept referenced, so that no garbage collection
# closes them (closing is the parent's business).
_inherited: list[sqlite3.Connection] = []
