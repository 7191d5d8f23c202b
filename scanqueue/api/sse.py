"""``GET /api/v1/events``: scan events as Server-Sent Events.

A stream starts now, or after ``Last-Event-ID``; it reads from the process's
:class:`~scanqueue.api.hub.EventHub` while the hub's window covers its cursor
and from the sink itself while it is further behind.  A comment every
heartbeat keeps proxies from closing it.  Open streams are capped
(``SCANQUEUE_SSE_MAX_SUBSCRIBERS``, 503); a stream gives its slot back however
it ends (:class:`_Subscription`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scanqueue.api.guards import Receive, Scope, Send, error_response
from scanqueue.api.state import state_of
from scanqueue.observe.events import Event

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0
REPLAY_PAGE = 500
SSE_RETRY_MS = 2000


def _sse(event: Event) -> str:
    return f"id: {event.id}\ndata: {event.to_json()}\n\n"


async def stream_events(request: Request) -> Response:
    state = state_of(request)
    sink = state.sink
    resume = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    scan_filter = request.query_params.get("scan_id") or None
    cursor: str | None = None
    if resume:
        try:
            sink.sort_key(resume)
        except ValueError:
            return error_response(
                400, f"Last-Event-ID {resume!r} is not an event id of this stream"
            )
        cursor = resume
    if state.subscribers >= state.settings.sse_max_subscribers:
        # Each stream holds a connection and a task for ever: a cap keeps a flood of
        # subscribers from starving the API (SCANQUEUE_SSE_MAX_SUBSCRIBERS).
        return error_response(
            503,
            f"too many event subscribers ({state.settings.sse_max_subscribers}); retry later",
            headers={"Retry-After": "5"},
        )
    hub = state.hub()
    if not await hub.wait_ready(10.0):
        return error_response(503, f"the event stream is not readable yet ({sink.description})")
    try:
        newest = await run_in_threadpool(sink.last_id)
    except Exception:
        newest = hub.head or sink.zero_id
    if cursor is None or sink.sort_key(cursor) > sink.sort_key(newest):
        # Ids only grow, so an id newer than the newest event belongs to another
        # stream (a reset database, another queue): start from now, not from never.
        cursor = newest

    async def follow() -> AsyncIterator[str]:
        nonlocal cursor
        assert cursor is not None
        yield f"retry: {SSE_RETRY_MS}\n: subscribed after {cursor}\n\n"
        last_sent = time.monotonic()
        while not hub.closed:
            changed = hub.changed
            key = sink.sort_key(cursor)
            if hub.covers(key):
                batch = hub.after(key, REPLAY_PAGE)
            else:
                try:
                    batch = await run_in_threadpool(sink.read_after, cursor, REPLAY_PAGE)
                except Exception as exc:
                    log.warning("replay from %s failed: %s", sink.description, exc)
                    await asyncio.sleep(1.0)
                    continue
                if not batch:
                    # Older than anything retained and nothing newer stored yet.
                    cursor = hub.head or cursor
                    continue
            if batch:
                cursor = batch[-1].id
                chunk = "".join(
                    _sse(e) for e in batch if scan_filter is None or e.scan_id == scan_filter
                )
                if chunk:
                    yield chunk
                    last_sent = time.monotonic()
                continue
            timeout = state.heartbeat_s - (time.monotonic() - last_sent)
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout)
                continue
            yield ": keepalive\n\n"
            last_sent = time.monotonic()

    # Counted from here (the event loop runs one handler step at a time, so the check
    # above and this count cannot interleave) until the response is done, whether or
    # not its body ever started.
    state.subscribers += 1
    return _Subscription(
        follow(),
        release=state.release_subscriber,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _Subscription(StreamingResponse):
    """A streaming response that gives its subscriber slot back however it ends."""

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._release: Callable[[], None] | None = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
