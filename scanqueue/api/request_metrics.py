"""Request metrics of ``scanqueue serve``: a counter and a histogram per route template.

``scanqueue_http_requests_total{route, method, status}`` and
``scanqueue_http_request_duration_seconds{route, method}`` (defined in
:mod:`scanqueue.observe.metrics`).  The label is the route's template
(``/api/v1/scans/{scan_id}``), never the path itself, so ids and typos cannot
grow the label set; paths no route matches count as ``(unmatched)``.  The time
is to the response's start (an event stream's long life is not a latency).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "(unmatched)"


def route_template(scope: Scope) -> str:
    app: Any = scope.get("app")
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return str(getattr(route, "path", UNMATCHED))
    return UNMATCHED


class RequestMetrics:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            from scanqueue.observe.metrics import observe_request

            with contextlib.suppress(Exception):  # metrics never break a request
                observe_request(
                    route_template(scope),
                    str(scope.get("method", "")),
                    status,
                    time.perf_counter() - started,
                )

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception:
            record(500)
            raise
