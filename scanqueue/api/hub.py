"""The event hub: one reader of the event sink per process, fanned out to every stream.

A single thread follows the sink (``XREAD BLOCK`` on Redis, a short poll on the
table) and keeps a window of recent events in memory, so a thousand
subscribers cost one reader; :mod:`scanqueue.api.sse` serves them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from scanqueue.observe.events import Event, EventSink

log = logging.getLogger(__name__)

HUB_WINDOW = 10_000  # events kept in memory for subscribers that are behind
HUB_BATCH = 500
HUB_WAIT_S = 1.0


class EventHub:
    """Follows the sink in one thread and fans new events out to every subscriber."""

    def __init__(
        self, sink: EventSink, window: int = HUB_WINDOW, wait_s: float = HUB_WAIT_S
    ) -> None:
        self.sink = sink
        self.window = window
        self.wait_s = wait_s
        self._keys: list[tuple[int, ...]] = []
        self._events: list[Event] = []
        self._floor: tuple[int, ...] | None = None  # every event after this is in the window
        self._head: str | None = None
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        """Start following the sink (idempotent; call from the event loop)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._follow, name="event-hub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """End every subscription and stop following (call from the event loop)."""
        self.closed = True
        self._stop.set()
        self._changed.set()
        self._ready.set()

    def close_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.close)
        self._stop.set()

    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) whenever new events arrive; take it before looking."""
        return self._changed

    @property
    def head(self) -> str | None:
        return self._head

    async def wait_ready(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    def covers(self, cursor: tuple[int, ...]) -> bool:
        return self._floor is not None and cursor >= self._floor

    def after(self, cursor: tuple[int, ...], limit: int) -> list[Event]:
        start = bisect.bisect_right(self._keys, cursor)
        return self._events[start : start + limit]

    def _follow(self) -> None:
        cursor: str | None = None
        failing = False
        while not self._stop.is_set():
            try:
                if cursor is None:
                    cursor = self.sink.last_id()
                    self._call(self._begin, cursor)
                found = self.sink.wait_after(cursor, HUB_BATCH, self.wait_s)
            except Exception as exc:
                if not failing:
                    log.warning("cannot read events from %s: %s", self.sink.description, exc)
                failing = True
                self._stop.wait(1.0)
                continue
            if failing:
                log.info("reading events from %s again", self.sink.description)
                failing = False
            if found:
                cursor = found[-1].id
                self._call(self._append, found)

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stop.set()
            return
        try:
            loop.call_soon_threadsafe(func, *args)
        except RuntimeError:  # the loop closed under us
            self._stop.set()

    def _begin(self, cursor: str) -> None:
        self._floor = self.sink.sort_key(cursor)
        self._head = cursor
        self._ready.set()

    def _append(self, found: list[Event]) -> None:
        for event in found:
            key = self.sink.sort_key(event.id)
            if self._keys and key <= self._keys[-1]:
                continue  # already have it
            self._keys.append(key)
            self._events.append(event)
        if len(self._events) > self.window * 2:
            cut = len(self._events) - self.window
            self._floor = self._keys[cut - 1]
            del self._keys[:cut]
            del self._events[:cut]
        if self._events:
            self._head = self._events[-1].id
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
