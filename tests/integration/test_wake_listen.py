"""PostgreSQL's watcher with the embedded bridge's start signal (tests/unit/test_wake.py
has the pipe itself)."""

from __future__ import annotations

import threading
import time

from scanqueue.dispatch.wake import StartSignal
from scanqueue.dispatch.watch import ListenWatcher


def test_a_start_wakes_a_listen_wait_only_while_the_window_is_full(pg_url: str) -> None:
    signal = StartSignal()
    watcher = ListenWatcher(pg_url, safety_poll_s=1.0, start_signal=signal)
    stop = threading.Event()
    try:
        assert watcher.wait(stop)  # connects; the first look
        # Window full (a timeout is given): a start ends the wait at once.
        threading.Timer(0.2, signal.notify).start()
        began = time.monotonic()
        assert watcher.wait(stop, timeout_s=5.0)
        assert 0.15 <= time.monotonic() - began < 0.9
        # Window not full (no timeout): a start is no reason to look; the safety
        # poll (1 s) is.
        signal.notify()
        began = time.monotonic()
        assert watcher.wait(stop)
        assert time.monotonic() - began >= 0.5
    finally:
        stop.set()
        watcher.close()
        signal.close()
