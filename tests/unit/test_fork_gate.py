"""A process forked while another thread is inside an SQLite transaction can write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from scanqueue.db.fork_gate import GATE
from scanqueue.db.store import Store

CHILD_BUSY_TIMEOUT_S = 3.0
REPO = Path(__file__).resolve().parents[2]


def _database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x INTEGER)")


def _write_in_a_forked_child(path: Path) -> int:
    """Fork; the child writes one row on a new connection; its exit status (0: it could)."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no cleanup, just the write
        code = 1
        signal.alarm(30)  # whatever happens, the child ends and the parent's wait with it
        try:
            db = sqlite3.connect(path, timeout=CHILD_BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (2)")
            db.execute("COMMIT")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _hold_a_write_transaction(
    begin: threading.Event, hold_s: float, gated: bool, path: Path
) -> None:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if gated:
        GATE.enter()
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (1)")
        begin.set()
        time.sleep(hold_s)
        db.execute("COMMIT")
    finally:
        # Closed inside the hold, as the store's connections are used: a fork while
        # this thread is in sqlite3_close (SQLite's global VFS mutex held) leaves the
        # child waiting on that mutex for good in its own first open.
        db.close()
        if gated:
            GATE.leave()


def _fork_during_a_transaction(path: Path, *, gated: bool) -> tuple[int, float]:
    """In a fresh interpreter: a test process holds the threads of earlier tests, and a
    child forked while one of them is inside a library's lock can hang on it."""
    script = (
        "import sys; from pathlib import Path;"
        " from tests.unit.test_fork_gate import _fork_here;"
        " print(*_fork_here(Path(sys.argv[1]), gated=sys.argv[2] == '1'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), "1" if gated else "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    code, took = done.stdout.split()
    return int(code), float(took)


def _fork_here(path: Path, *, gated: bool) -> tuple[int, float]:
    begin = threading.Event()
    holder = threading.Thread(target=_hold_a_write_transaction, args=(begin, 0.5, gated, path))
    holder.start()
    assert begin.wait(10)
    began = time.monotonic()
    code = _write_in_a_forked_child(path)
    took = time.monotonic() - began
    holder.join(10)
    assert GATE.holders == 0
    return code, took


def test_without_the_gate_the_child_finds_the_database_locked_for_good(tmp_path: Path) -> None:
    # The hazard itself: the transaction ends 0.5 s after the fork, yet the child,
    # which inherited the bookkeeping of a lock it does not hold, never gets in.
    path = tmp_path / "x.db"
    _database(path)
    code, _ = _fork_during_a_transaction(path, gated=False)
    assert code == 1


def test_the_gate_holds_the_fork_until_the_transaction_ends(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    _database(path)
    code, took = _fork_during_a_transaction(path, gated=True)
    assert code == 0
    assert 0.2 < took < 5.0  # the fork waited for the commit, not for the gate's limit


def test_the_stores_sqlite_transactions_hold_the_gate(tmp_path: Path) -> None:
    from scanqueue.db.migrate import upgrade

    store = Store(f"sqlite:///{tmp_path / 'scans.db'}")
    upgrade(store)
    seen: list[int] = []
    with store._tx() as conn:
        seen.append(GATE.holders)
        with store._tx(single=True):  # nested on one thread: counted once
            seen.append(GATE.holders)
        conn.exec_driver_sql("SELECT 1")
    with store._locked_tx("", {}):
        seen.append(GATE.holders)
    seen.append(GATE.holders)
    assert seen == [1, 1, 1, 0]
    store.dispose()


def test_a_thread_that_forks_inside_its_own_hold_leaves_the_gate_in_the_child() -> None:
    # The fork does not wait for the forking thread itself; in the child that thread
    # still holds the gate and leaves it on the way out.
    with GATE.held():
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                held_in_child = GATE.holders
                GATE.leave()
                code = 0 if (held_in_child, GATE.holders) == (1, 0) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert GATE.holders == 1
    assert os.waitstatus_to_exitcode(status) == 0
    assert GATE.holders == 0


class _Recorded:
    """A stand-in SQLite connection that records whether the gate was held when closed."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.closed_with: list[int] = []

    def execute(self, _sql: str) -> Any:
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        raise AssertionError("not reached")

    def close(self) -> None:
        self.closed_with.append(GATE.holders)


def test_sqlite_connections_are_closed_inside_the_gate(tmp_path: Path) -> None:
    """sqlite3_close takes SQLite's process-wide VFS mutex: a fork in the middle of it
    left the child waiting on that mutex in its first open.  So every close of
    scanqueue's own SQLite connections happens inside the gate: the commit watch's
    (on close, and when a look fails) and the store's pools when disposed."""
    from sqlalchemy import event

    from scanqueue.db.migrate import upgrade
    from scanqueue.db.sqlite_commits import CommitWatch

    path = tmp_path / "scans.db"
    watch = CommitWatch.of_url(f"sqlite:///{path}")
    for fail in (False, True):
        conn = _Recorded(fail)
        watch._conn, watch._pid = conn, os.getpid()  # type: ignore[assignment]
        if fail:
            assert watch._version() is None  # a failed look drops the connection
        else:
            watch.close()
        assert conn.closed_with == [1] and watch._conn is None
    assert GATE.holders == 0

    store = Store(f"sqlite:///{path}")
    upgrade(store)
    closed_with: list[int] = []
    for engine in (store.engine, store._autocommit_engine.engine):
        event.listen(engine, "close", lambda *_: closed_with.append(GATE.holders))
    with store._tx(single=True) as conn:
        conn.exec_driver_sql("SELECT 1")
    store.dispose()
    assert closed_with and set(closed_with) == {1}
    assert GATE.holders == 0
