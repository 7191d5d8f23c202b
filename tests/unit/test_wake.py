"""The embedded bridge's start signal: a pool process's start wakes a full window's wait."""

from __future__ import annotations

import multiprocessing
import threading
import time

from scanqueue.dispatch import wake
from scanqueue.dispatch.wake import StartSignal
from scanqueue.dispatch.watch import PollWatcher


def _notify_from_child() -> None:
    wake.notify_started()


def test_a_forked_process_wakes_the_parent_through_the_inherited_pipe() -> None:
    signal = wake.install_start_signal()
    try:
        child = multiprocessing.get_context("fork").Process(target=_notify_from_child)
        child.start()
        child.join(10)
        assert child.exitcode == 0
        watcher = PollWatcher(60.0, start_signal=signal)
        began = time.monotonic()
        assert watcher.wait(threading.Event(), timeout_s=5.0)
        assert time.monotonic() - began < 1.0
    finally:
        signal.close()


def test_a_full_pipe_never_blocks_and_one_drain_empties_it() -> None:
    signal = StartSignal()
    try:
        began = time.monotonic()
        for _ in range(200_000):  # far beyond a pipe's 64 KiB
            signal.notify()
        assert time.monotonic() - began < 10.0
        signal.drain()
        watcher = PollWatcher(60.0, start_signal=signal)
        began = time.monotonic()
        assert watcher.wait(threading.Event(), timeout_s=0.3)
        assert time.monotonic() - began >= 0.25  # nothing pending: the whole timeout
    finally:
        signal.close()


def test_a_start_ends_a_timed_wait_early_and_stop_still_ends_it() -> None:
    signal = StartSignal()
    try:
        watcher = PollWatcher(60.0, start_signal=signal)
        stop = threading.Event()
        threading.Timer(0.2, signal.notify).start()
        began = time.monotonic()
        assert watcher.wait(stop, timeout_s=5.0)
        assert 0.15 <= time.monotonic() - began < 2.0
        stop.set()
        assert not watcher.wait(stop, timeout_s=0.1)
    finally:
        signal.close()


def test_without_a_signal_installed_notify_is_a_no_op() -> None:
    saved = wake._installed
    wake._installed = None
    try:
        wake.notify_started()
        assert wake.installed_start_signal() is None
    finally:
        wake._installed = saved


def test_notify_after_close_is_harmless() -> None:
    signal = StartSignal()
    signal.close()
    signal.notify()
    signal.drain()
    signal.close()


def test_a_wait_ended_by_starts_says_how_many() -> None:
    signal = StartSignal()
    try:
        for _ in range(3):
            signal.notify()
        watcher = PollWatcher(60.0, start_signal=signal)
        assert watcher.wait(threading.Event(), timeout_s=5.0)
        assert watcher.starts == 3
        assert watcher.wait(threading.Event(), timeout_s=0.05)
        assert watcher.starts == 0  # the time ran out: a look, not a count
    finally:
        signal.close()
