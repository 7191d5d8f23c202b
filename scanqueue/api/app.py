"""``scanqueue serve``: the HTTP API, the live event stream and the page (CONTRACT §4).

This module owns the ASGI app (Starlette, served by uvicorn) and the ``serve``
command.  Routes: ``/healthz``, ``/metrics``, ``/openapi.json``, ``/`` (the
page in ``web_static/``) and, behind the optional bearer token, ``/api/v1/scans``
(create, list, get, cancel) and ``/api/v1/events`` (Server-Sent Events).

Secure by default (CONTRACT §4): ``serve`` refuses to listen beyond loopback
without a token unless ``SCANQUEUE_API_INSECURE=true``; without a token, writes
must name a loopback ``Host`` (and ``Origin``, when sent) — :class:`LoopbackWriteGuard`;
POST bodies must be JSON (415), at most 1 MiB (413), parse (400, however deep)
and validate (422, :mod:`scanqueue.db.scan_request`); open event streams are capped
(503).

Events reach subscribers through one :class:`EventHub` per process: a single
thread follows the event sink (``XREAD BLOCK`` on Redis, a short poll on the
table) and keeps a window of recent events in memory, so a thousand
subscribers cost one reader.  A subscriber resuming from an id older than that
window reads the sink itself until it catches up.  Database calls run in the
thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

import click
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scanqueue.config import Settings, mask_url
from scanqueue.db.scan_request import InvalidScanRequest, validate_scan_request
from scanqueue.db.schema import STATUSES
from scanqueue.db.store import Store, describe_db_error, store_for
from scanqueue.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ScanqueueError,
    UnavailableError,
)
from scanqueue.observe.events import Event, EventSink, emit_standalone, event_sink_for

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_PORT = 8000
HEARTBEAT_S = 15.0
HUB_WINDOW = 10_000  # events kept in memory for subscribers that are behind
HUB_BATCH = 500
HUB_WAIT_S = 1.0
REPLAY_PAGE = 500
SSE_RETRY_MS = 2000
MAX_BODY_BYTES = 1024 * 1024  # 1 MiB (CONTRACT §4); larger bodies answer 413
DEFAULT_PAGE = 50
MAX_PAGE = 1000
GRACEFUL_SHUTDOWN_S = 3


# -- the event hub -----------------------------------------------------------------------


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


# -- auth ------------------------------------------------------------------------------------


class BearerAuth:
    """Every ``/api/`` request must carry ``Authorization: Bearer <token>`` when a token is set."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.token is not None
            and scope["type"] == "http"
            and str(scope.get("path", "")).startswith("/api/")
            and not self._authorized(scope)
        ):
            response = JSONResponse(
                {"error": "unauthorized: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="scanqueue"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(given.strip(), self.token)
        return False


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or name, without port) means this machine only."""
    host = host.strip().lower().strip("[]")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]@/]+))(?::\d{1,5})?")


def _loopback_header(value: str, *, is_origin: bool) -> bool:
    """Whether a ``Host`` value, or an ``Origin``'s authority, is a loopback name."""
    value = value.strip()
    if is_origin:
        scheme, sep, value = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return False  # "null" (a sandboxed or file: page) or anything odd
    match = _AUTHORITY.fullmatch(value)
    if match is None:
        return False
    if match["v6"] is not None:
        return match["v6"] == "::1"
    return match["name"].lower() in ("localhost", "127.0.0.1")


class LoopbackWriteGuard:
    """Without a token, writes must come from this machine's own names (CONTRACT §4).

    A token-less server listens on loopback only, but a browser on the same
    machine can still be made to write to it: by any web page (a cross-site
    ``POST``, whose ``Origin`` names that page) or through DNS rebinding (whose
    ``Host`` names the attacker's domain).  So a non-safe request whose ``Host``,
    or ``Origin`` when sent, is not ``localhost``, ``127.0.0.1`` or ``[::1]``
    (any port) answers 403.  With a token the bearer check does this job.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.active = not token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.active and scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            problem = self._problem(scope)
            if problem is not None:
                await _error(403, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _problem(scope: Scope) -> str | None:
        host: str | None = None
        origin: str | None = None
        for name, value in scope.get("headers", []):
            lowered = bytes(name).lower()
            if lowered == b"host":
                host = bytes(value).decode("latin-1")
            elif lowered == b"origin":
                origin = bytes(value).decode("latin-1")
        if host is None or not _loopback_header(host, is_origin=False):
            return (
                "forbidden: without SCANQUEUE_API_TOKEN only requests to localhost, "
                "127.0.0.1 or [::1] may write"
            )
        if origin is not None and not _loopback_header(origin, is_origin=True):
            return (
                "forbidden: without SCANQUEUE_API_TOKEN only pages served from localhost, "
                "127.0.0.1 or [::1] may write"
            )
        return None


# -- helpers ---------------------------------------------------------------------------------


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class RequestInvalid(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.scanqueue
    return state


class AppState:
    def __init__(self, settings: Settings, heartbeat_s: float, hub_window: int) -> None:
        self.settings = settings
        self.heartbeat_s = heartbeat_s
        self.hub_window = hub_window
        self.subscribers = 0  # open event streams
        self._store: Store | None = None
        self._sink: EventSink | None = None
        self._hub: EventHub | None = None
        self._redis: Any = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = store_for(self.settings.database_url)
        return self._store

    @property
    def sink(self) -> EventSink:
        if self._sink is None:
            self._sink = event_sink_for(self.settings)
        return self._sink

    def hub(self) -> EventHub:
        if self._hub is None:
            self._hub = EventHub(self.sink, window=self.hub_window)
            self._hub.start()
        return self._hub

    def release_subscriber(self) -> None:
        self.subscribers -= 1

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()

    def close_threadsafe(self) -> None:
        if self._hub is not None:
            self._hub.close_threadsafe()

    def redis(self) -> Any:
        if self._redis is None and self.settings.redis_url:
            from scanqueue.db.redisconn import redis_client

            self._redis = redis_client(self.settings.redis_url)
        return self._redis


# -- scans -----------------------------------------------------------------------------------


async def _read_json_body(request: Request) -> Any:
    """The request's JSON body; RequestInvalid with 415, 413 or 400 otherwise.

    The type must be ``application/json``: a browser sends a cross-site
    ``text/plain`` form without asking first (no CORS preflight), JSON it cannot.
    The size is checked while reading, so a chunked body without Content-Length
    is cut off at the limit too.  Any unparsable body is a 400, including one
    nested too deeply for the parser (a ``RecursionError``, not a 500).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestInvalid(415, "the body must be Content-Type: application/json")
    too_large = RequestInvalid(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RequestInvalid(
            400, 'expected a JSON body like {"providers": ["aws"], "frameworks": []}'
        )
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise RequestInvalid(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise RequestInvalid(400, f"the body is not valid JSON: {_first_line(str(exc))}") from None


def _not_json(name: str) -> Any:
    """Python's parser takes NaN and Infinity; JSON (RFC 8259) does not."""
    raise ValueError(f"{name} is not JSON")


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


async def create_scan(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _read_json_body(request)
        scan = validate_scan_request(body)
    except RequestInvalid as exc:
        return _error(exc.status, exc.message)
    except InvalidScanRequest as exc:
        return _error(422, "invalid scan request", details=exc.details)
    row = await run_in_threadpool(state.store.enqueue, scan.providers, scan.frameworks, scan.user)
    return JSONResponse(
        row.to_json(), status_code=201, headers={"Location": f"/api/v1/scans/{row.id}"}
    )


async def get_scan(request: Request) -> Response:
    row = await run_in_threadpool(_state(request).store.get, request.path_params["scan_id"])
    return JSONResponse(row.to_json())


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestInvalid(422, f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise RequestInvalid(422, f"{name} must be from {low} to {high}, got {value}")
    return value


async def list_scans(request: Request) -> Response:
    status = request.query_params.get("status") or None
    try:
        if status is not None and status not in STATUSES:
            raise RequestInvalid(422, f"status must be one of {', '.join(STATUSES)}")
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
    except RequestInvalid as exc:
        return _error(exc.status, exc.message)
    rows = await run_in_threadpool(_state(request).store.list_scans, status, limit, offset)
    rows.reverse()  # the store returns a page oldest first; the API pages newest first
    return JSONResponse(
        {
            "scans": [r.to_json() for r in rows],
            "limit": limit,
            "offset": offset,
            "next_offset": offset + limit if len(rows) == limit else None,
        }
    )


async def cancel_scan(request: Request) -> Response:
    state = _state(request)
    row = await run_in_threadpool(state.store.cancel, request.path_params["scan_id"])
    await run_in_threadpool(
        emit_standalone, state.settings, "scan.canceled", row.id, {"reason": row.error}
    )
    return JSONResponse(row.to_json())


# -- events ----------------------------------------------------------------------------------


def _sse(event: Event) -> str:
    return f"id: {event.id}\ndata: {event.to_json()}\n\n"


async def stream_events(request: Request) -> Response:
    state = _state(request)
    sink = state.sink
    resume = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    scan_filter = request.query_params.get("scan_id") or None
    cursor: str | None = None
    if resume:
        try:
            sink.sort_key(resume)
        except ValueError:
            return _error(400, f"Last-Event-ID {resume!r} is not an event id of this stream")
        cursor = resume
    if state.subscribers >= state.settings.sse_max_subscribers:
        # Each stream holds a connection and a task for ever: a cap keeps a flood of
        # subscribers from starving the API (SCANQUEUE_SSE_MAX_SUBSCRIBERS).
        return _error(
            503,
            f"too many event subscribers ({state.settings.sse_max_subscribers}); retry later",
            headers={"Retry-After": "5"},
        )
    hub = state.hub()
    if not await hub.wait_ready(10.0):
        return _error(503, f"the event stream is not readable yet ({sink.description})")
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


# -- health, metrics, documents ------------------------------------------------------------------


def _check_health(state: AppState) -> dict[str, str]:
    settings = state.settings
    checks: dict[str, str] = {}
    try:
        state.store.ping()
        checks["database"] = "ok" if state.store.has_schema() else "no scans table (run upgrade)"
    except UnavailableError as exc:
        checks["database"] = str(exc)
    except Exception as exc:
        checks["database"] = f"error: {describe_db_error(exc)}"
    if settings.redis_url:
        try:
            state.redis().ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"cannot reach {mask_url(settings.redis_url)}: {exc}"
    broker = settings.broker_url
    if broker and broker != settings.redis_url:
        checks["broker"] = _check_broker(broker)
    return checks


def _check_broker(url: str) -> str:
    if url.startswith("sqla+"):
        return "ok"  # embedded beside the database: checked with it
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            from scanqueue.db.redisconn import redis_client

            client = redis_client(url)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu.connection import Connection

            with Connection(url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call,unused-ignore]
                conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"cannot reach {mask_url(url)}: {exc}"
    return "ok"


async def healthz(request: Request) -> Response:
    """Ok or not, per dependency, and nothing about hosts, URLs or errors.

    ``/healthz`` answers without the token (probes), so the reasons go to the
    log (URLs masked), never into the response.
    """
    state = _state(request)
    details = await run_in_threadpool(_check_health, state)
    checks: dict[str, str] = {}
    for name, detail in details.items():
        if detail == "ok":
            checks[name] = "ok"
        else:
            checks[name] = "unavailable"
            log.warning("healthz: %s is not healthy: %s", name, detail)
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ok" if healthy else "unavailable",
            "checks": checks,
            "event_subscribers": state.subscribers,
        },
        status_code=200 if healthy else 503,
    )


def _render_metrics(state: AppState) -> tuple[bytes, str]:
    from scanqueue.observe import metrics as scanqueue_metrics

    try:
        return scanqueue_metrics.render_metrics(state.store)
    except ScanqueueError as exc:  # no queue depth without a database; the rest still
        log.warning("queue depth not exported: %s", exc)
        return scanqueue_metrics.render_metrics(None)


async def metrics(request: Request) -> Response:
    data, content_type = await run_in_threadpool(_render_metrics, _state(request))
    return Response(data, headers={"Content-Type": content_type})


async def index(request: Request) -> Response:
    page = resources.files("scanqueue.api").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


def _scan_schema() -> dict[str, Any]:
    text_or_null = {"type": ["string", "null"]}
    time_or_null = {"type": ["string", "null"], "format": "date-time"}
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": list(STATUSES)},
            "providers_scanned": {"type": "array", "items": {"type": "string"}},
            "frameworks_scanned": {"type": "array", "items": {"type": "string"}},
            "triggered_by_user": text_or_null,
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": time_or_null,
            "finished_at": time_or_null,
            "error": text_or_null,
            "findings_count": {"type": "integer"},
            "attempts": {"type": "integer"},
        },
        "required": ["id", "status", "created_at", "attempts"],
    }


def _responses(ok: tuple[str, str], *codes: str) -> dict[str, Any]:
    descriptions = {
        "400": "Malformed request",
        "401": "Missing or wrong bearer token",
        "403": "Without a token: a write whose Host or Origin is not a loopback name",
        "404": "No scan with that id",
        "409": "The scan already finished",
        "413": "The body is larger than 1 MiB",
        "415": "The body is not Content-Type: application/json",
        "422": "The request is well-formed but invalid",
        "503": "The database is unreachable",
    }
    out: dict[str, Any] = {
        ok[0]: {
            "description": ok[1],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Scan"}}},
        }
    }
    for code in codes:
        out[code] = {
            "description": descriptions[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return out


SCAN_ID_PARAM = {"name": "scan_id", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "scanqueue",
        "version": "1",
        "description": "Enqueue, inspect and cancel compliance scans; follow their events.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Scan": _scan_schema(),
            "ScanRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["providers"],
                "properties": {
                    "providers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "frameworks": {"type": "array", "items": {"type": "string"}},
                    "user": {"type": ["string", "null"]},
                },
            },
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "details": {"type": "array"}},
                "required": ["error"],
            },
            "Event": {
                "type": "object",
                "description": "Payload fields (attempt, message, percent, findings …) as well",
                "properties": {
                    "id": {"type": "string"},
                    "type": {"type": "string"},
                    "scan_id": {"type": "string"},
                    "at": {"type": "string", "format": "date-time"},
                    "attempt": {"type": "integer"},
                },
                "required": ["id", "type", "scan_id", "at"],
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Database and broker reachability",
                "security": [],
                "responses": {"200": {"description": "Healthy"}, "503": {"description": "Not"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Text exposition format"}},
            }
        },
        "/api/v1/scans": {
            "post": {
                "summary": "Enqueue a scan",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ScanRequest"}}
                    },
                },
                "responses": _responses(
                    ("201", "The queued scan"), "400", "401", "403", "413", "415", "422", "503"
                ),
            },
            "get": {
                "summary": "List scans, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"enum": list(STATUSES)}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": {
                        "description": "One page of scans",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "scans": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Scan"},
                                        },
                                        "limit": {"type": "integer"},
                                        "offset": {"type": "integer"},
                                        "next_offset": {"type": ["integer", "null"]},
                                    },
                                }
                            }
                        },
                    },
                    "401": {"description": "Missing or wrong bearer token"},
                    "422": {"description": "Bad status, limit or offset"},
                },
            },
        },
        "/api/v1/scans/{scan_id}": {
            "get": {
                "summary": "One scan",
                "parameters": [SCAN_ID_PARAM],
                "responses": _responses(("200", "The scan"), "401", "404", "503"),
            }
        },
        "/api/v1/scans/{scan_id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running scan",
                "parameters": [SCAN_ID_PARAM],
                "responses": _responses(
                    ("200", "The canceled scan"), "401", "403", "404", "409", "503"
                ),
            }
        },
        "/api/v1/events": {
            "get": {
                "summary": "Scan events as Server-Sent Events",
                "description": (
                    "Each event has an `id:` and a `data:` line holding an Event object. "
                    "Without Last-Event-ID the stream starts now; with it, every retained "
                    "event after that id is replayed first. A comment is sent every 15 s."
                ),
                "parameters": [
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "scan_id", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "An endless event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "400": {"description": "Last-Event-ID is not an id of this stream"},
                    "401": {"description": "Missing or wrong bearer token"},
                    "503": {"description": "SCANQUEUE_SSE_MAX_SUBSCRIBERS streams are open"},
                },
            }
        },
    },
}


# -- the app ---------------------------------------------------------------------------------


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc))


async def _conflict(request: Request, exc: Exception) -> Response:
    return _error(409, str(exc))


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _error(503, str(exc))


async def _scanqueue_error(request: Request, exc: Exception) -> Response:
    return _error(500, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(
    settings: Settings | None = None,
    *,
    heartbeat_s: float = HEARTBEAT_S,
    hub_window: int = HUB_WINDOW,
) -> Starlette:
    """The ASGI app for ``settings`` (read from the environment when omitted)."""
    settings = settings or Settings.from_env()
    state = AppState(settings, heartbeat_s, hub_window)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.close()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/api/v1/scans", create_scan, methods=["POST"]),
            Route("/api/v1/scans", list_scans, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}", get_scan, methods=["GET"]),
            Route("/api/v1/scans/{scan_id}/cancel", cancel_scan, methods=["POST"]),
            Route("/api/v1/events", stream_events, methods=["GET"]),
        ],
        middleware=[
            Middleware(LoopbackWriteGuard, token=settings.api_token),
            Middleware(BearerAuth, token=settings.api_token),
        ],
        exception_handlers={
            NotFoundError: _not_found,
            ConflictError: _conflict,
            UnavailableError: _unavailable,
            ScanqueueError: _scanqueue_error,
            HTTPException: _http_error,
        },
        lifespan=lifespan,
    )
    app.state.scanqueue = state
    return app


# -- the command -----------------------------------------------------------------------------


def _default_port() -> tuple[int, bool]:
    raw = os.environ.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT, False
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError("PORT", f"expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError("PORT", f"must be from 0 to 65535, got {port}")
    return port, True


@click.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Default: $PORT, 8000.")
@click.option(
    "--host", default=None, help="Default: 0.0.0.0 when $PORT is set (platforms), else 127.0.0.1."
)
def serve_command(port: int | None, host: str | None) -> None:
    """Serve the HTTP API, the event stream and the page."""
    import uvicorn

    from scanqueue.observe.logs import configure_logging

    settings = Settings.from_env()
    env_port, platform = _default_port()
    if port is None:
        port = env_port
    if host is None:
        # A platform that hands out $PORT routes to the container's interface.
        host = "0.0.0.0" if platform else "127.0.0.1"  # noqa: S104
    check_exposure(settings, host)
    configure_logging(settings.log_format)
    store = store_for(settings.database_url)
    # Containers often start before their database: retry (logged), then one line.
    store.wait_until_ready(settings.connect_timeout_s)
    # Bound here, before anything says "serving": a busy port is one line and exit 1,
    # not uvicorn's log and exit 3.
    sock = bind_socket(host, port)

    app = create_app(settings)
    state: AppState = app.state.scanqueue

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if sockets is not None and self.started:
                # uvicorn says "running on" only for sockets it bound itself.
                self._log_started_message(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Event streams never end by themselves: end them so shutdown is prompt.
            state.close_threadsafe()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers
    # that ends the process with status 0 instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving on http://%s:%d (database %s)", shown, bound_port, store.masked_url)
    Server(config).run(sockets=[sock])


class ServeRefused(ScanqueueError):
    """``serve`` will not start as asked (exposed without a token, port taken)."""


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to listen beyond loopback without a token, unless told so on purpose."""
    if settings.api_token or settings.api_insecure or is_loopback_host(host):
        return
    raise ServeRefused(
        f"refusing to serve on {host} without SCANQUEUE_API_TOKEN: anyone who can reach it "
        "could enqueue and cancel scans; set SCANQUEUE_API_TOKEN (or "
        "SCANQUEUE_API_INSECURE=true to allow it on purpose)"
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ServeRefused with the reason in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ServeRefused(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ServeRefused(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum: int, frame: Any) -> None:
    sys.exit(0)
