"""No SQLite statement of this process in flight while it forks.

SQLite keeps its file locks' bookkeeping per process, shared by every connection
to a file.  A process forked while one of its threads is inside an SQLite
statement or transaction inherits that bookkeeping ("this process holds the
lock") but not the lock itself, and not the thread that would release it: every
write the child then tries waits on SQLite's busy handler until it gives up, for
as long as the child lives.  SQLite's documentation warns against exactly this
(https://sqlite.org/howtocorrupt.html, "carrying an open database connection
across a fork()").  It happened to the worker: Celery's pool forks a process when
it grows or replaces one, while the embedded bridge's threads use the database,
and in probe runs a grown pool process hung in its first start of a scan in
every run of four 600-scan bursts.

So every SQLite use by the store (:class:`~scanqueue.db.engine.StoreBase`'s
transactions) and by :class:`~scanqueue.db.sqlite_commits.CommitWatch` holds
:data:`GATE` for its duration, and an ``os.register_at_fork`` hook makes a fork
wait (at most :data:`FORK_WAIT_S`) until no other thread holds it, keeping new
holders out until the fork is done.  A thread's nested holds count once.
Holds are milliseconds long; a fork that still finds one after the wait goes
ahead and says so in the log.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic

log = logging.getLogger(__name__)

FORK_WAIT_S = 5.0


class ForkGate:
    """Many holders at once, or one fork; never both."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._forking = False
        self._mine = threading.local()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        mine = getattr(self._mine, "count", 0)
        if mine == 0:
            with self._cond:
                while self._forking:
                    self._cond.wait()
                self._holders += 1
        self._mine.count = mine + 1

    def leave(self) -> None:
        mine = self._mine.count - 1
        self._mine.count = mine
        if mine == 0:
            with self._cond:
                self._holders -= 1
                if self._holders == 0:
                    self._cond.notify_all()

    @property
    def holders(self) -> int:
        return self._holders

    def before_fork(self) -> None:
        own = 1 if getattr(self._mine, "count", 0) else 0
        deadline = monotonic() + FORK_WAIT_S
        with self._cond:
            self._forking = True
            while self._holders > own:
                left = deadline - monotonic()
                if left <= 0:
                    log.warning(
                        "forking while %d other thread(s) use SQLite (waited %gs): the new"
                        " process may find the database locked for good",
                        self._holders - own,
                        FORK_WAIT_S,
                    )
                    break
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # The other threads are gone, and the lock may have been held at the fork; the
        # forking thread's own hold goes on (it leaves the gate in the child too).
        own = getattr(self._mine, "count", 0)
        self._reset()
        if own:
            self._holders = 1
            self._mine.count = own


GATE = ForkGate()

os.register_at_fork(
    before=GATE.before_fork,
    after_in_parent=GATE.after_fork_in_parent,
    after_in_child=GATE.after_fork_in_child,
)
