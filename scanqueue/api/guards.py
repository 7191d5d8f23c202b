"""What every request passes before a route sees it, and how a refusal reads
(docs/reference.md#commands).

Owns the bearer-token check on ``/api/`` (:class:`BearerAuth`, 401), the
loopback rule for token-less writes (:class:`LoopbackWriteGuard`, 403), what a
loopback host is (also used by ``serve`` to refuse exposure), and the limits on
a POST body: JSON only (415), at most 1 MiB (413), parsable however deep (400)
— :func:`read_json_body`.  Every error answer is ``{"error": …}``
(:func:`error_response`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB (docs/reference.md#commands); larger bodies answer 413


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class RequestInvalid(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


# -- auth ------------------------------------------------------------------------------------


class BearerAuth:
    """Every ``/api/`` request must carry ``Authorization: Bearer <token>`` when a token is set.

    The header is the only credential, for reads and writes alike (docs/reference.md#commands):
    no cookie, no query parameter.  The console reads the event stream with
    ``fetch()``, which sends the header (``docs/console.md``).
    """

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
            if bytes(name).lower() == b"authorization":
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
    """Without a token, writes must come from this machine's own names (docs/reference.md#commands).

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
                await error_response(403, problem)(scope, receive, send)
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


# -- the body ----------------------------------------------------------------------------------


async def read_json_body(request: Request) -> Any:
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


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as a whole number in [low, high]; 422 naming it otherwise."""
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
