"""The embedded bridge's "a scan started" signal from its worker's pool processes.

While the dispatch window is full the bridge can claim nothing until a dispatched
scan starts, and a start notifies nobody: polling for it either wastes queries or,
with short scans, lets the window run dry between looks (c2 no-op throughput fell
to less than half of an unbounded window's).  So a worker with the embedded bridge
makes a pipe before its pool forks; each pool process writes one byte to it after
a start commits (:class:`StartSignalObserver`), and the bridge's watcher wakes on
it while the window is full.  Both ends are non-blocking: a full pipe already holds
a pending wake-up, so a write that would block is dropped.

A standalone bridge (``scanqueue bridge``) has no such pipe and keeps polling
(docs/reference.md#scanqueue-settings).
"""

from __future__ import annotations

import contextlib
import os

from scanqueue.observe.observer import NullObserver, RunInfo

READ_CHUNK = 4096


class StartSignal:
    """A non-blocking pipe: :meth:`notify` in any forked process, :meth:`drain` in the bridge."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.closed = False

    def fileno(self) -> int:
        """The read end, for ``select``."""
        return self._read_fd

    def notify(self) -> None:
        # Full (a wake-up is pending already) or closed at shutdown: nothing to do.
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")

    def drain(self) -> int:
        """Read every pending byte (one look answers them all); returns how many: the
        starts signalled since the last drain (fewer if the pipe was full)."""
        count = 0
        while True:
            try:
                chunk = os.read(self._read_fd, READ_CHUNK)
            except (BlockingIOError, OSError):
                return count
            if not chunk:
                return count
            count += len(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


_installed: StartSignal | None = None


def install_start_signal() -> StartSignal:
    """Make this process's signal (call before the pool forks; idempotent)."""
    global _installed
    if _installed is None or _installed.closed:
        _installed = StartSignal()
    return _installed


def installed_start_signal() -> StartSignal | None:
    return _installed


def notify_started() -> None:
    """After a start commits: wake the embedded bridge, if this worker has one."""
    signal = _installed
    if signal is not None and not signal.closed:
        signal.notify()


class StartSignalObserver(NullObserver):
    """A run observer whose only job is :func:`notify_started` (first in the list)."""

    def started(self, run: RunInfo) -> None:
        if not run.successor_sent:  # else the start took one out and put one in
            notify_started()

    def canceled(self, run: RunInfo, duration_s: float) -> None:
        pass
