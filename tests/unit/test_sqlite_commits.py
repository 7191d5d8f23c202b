"""Another connection's commit to an SQLite file wakes a waiting bridge at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scanqueue.db.sqlite_commits import CommitWatch
from scanqueue.dispatch.watch import PollWatcher, watcher_for


def _database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE scans (id TEXT)")


def _insert_later(path: Path, after_s: float) -> threading.Timer:
    def insert() -> None:
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO scans VALUES ('a')")

    timer = threading.Timer(after_s, insert)
    timer.start()
    return timer


def test_a_commit_by_another_connection_is_seen_and_earlier_ones_are_not(tmp_path: Path) -> None:
    path = tmp_path / "scans.db"
    _database(path)
    watch = CommitWatch.of_url(f"sqlite:///{path}")
    _insert_later(path, 0).join()
    watch.mark()
    assert not watch.changed()  # the commit before the mark is not news
    _insert_later(path, 0).join()
    assert watch.changed()
    watch.close()


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, PollWatcher]]:
    """A database file and the bridge's watcher on it, with a 60 s tick."""
    path = tmp_path / "scans.db"
    _database(path)
    watcher = watcher_for(f"sqlite:///{path}", poll_every_s=60.0)
    assert isinstance(watcher, PollWatcher)
    try:
        yield path, watcher
    finally:
        watcher.close()


def test_the_poll_watcher_wakes_on_another_programs_insert_not_its_tick(
    watched: tuple[Path, PollWatcher],
) -> None:
    # The contract's bound on SQLite is one poll interval; an insert is now seen in
    # milliseconds, and the tick stays the guarantee.
    path, watcher = watched
    timer = _insert_later(path, 0.2)
    began = time.monotonic()
    assert watcher.wait(threading.Event())
    waited = time.monotonic() - began
    timer.join()
    assert waited < 5.0, f"waited {waited:.1f}s: the 60 s tick, not the insert, woke it"
    # A full window's early look (a standalone bridge has no start signal): a
    # worker's start commits, and that ends the wait too.
    timer = _insert_later(path, 0.2)
    began = time.monotonic()
    assert watcher.wait(threading.Event(), timeout_s=30.0)
    assert time.monotonic() - began < 5.0
    timer.join()


def test_stop_ends_the_wait_and_nothing_to_watch_falls_back_to_the_tick(
    watched: tuple[Path, PollWatcher],
) -> None:
    _, watcher = watched
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    assert watcher.wait(stop) is False
    assert time.monotonic() - began < 5.0

    unwatched = PollWatcher(0.2, commits=CommitWatch.of_url("sqlite://"))  # in memory
    assert unwatched.commits.path is None
    began = time.monotonic()
    assert unwatched.wait(threading.Event())
    assert 0.1 < time.monotonic() - began < 5.0


def test_a_commit_made_while_the_bridge_looks_wakes_its_next_wait(
    watched: tuple[Path, PollWatcher],
) -> None:
    # The version is taken when the wait returns, before the look: an insert that
    # lands between the look's read and the next wait is not news that was missed.
    path, watcher = watched
    timer = _insert_later(path, 0.1)
    assert watcher.wait(threading.Event())  # woken by that insert; the bridge looks
    timer.join()
    _insert_later(path, 0).join()  # another program inserts during the look
    began = time.monotonic()
    assert watcher.wait(threading.Event())
    assert time.monotonic() - began < 5.0, "the insert during the look was missed"
