"""The console's session cookie: proof of the API token that a browser may replay on reads.

An ``EventSource`` cannot send an ``Authorization`` header, so the console
trades the bearer token (``POST /api/v1/session``) for a short-lived cookie
whose value is an expiry and an HMAC-SHA256 of it keyed by the token
(``<expiry>.<hex mac>``) — never the token itself, so a leaked cookie stops
working at its expiry and a changed token voids every cookie at once.
:class:`~scanqueue.api.guards.BearerAuth` accepts it only on ``GET`` and
``HEAD`` under ``/api/`` (the event stream and reads); writes still need the
header, so a cross-site request riding on the cookie can change nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE_NAME = "scanqueue_session"
COOKIE_PATH = "/api/"
SESSION_TTL_S = 3600  # seconds a session cookie is good for; the console renews it
_CONTEXT = b"scanqueue console session v1\x00"


def _mac(token: bytes, expires: int) -> str:
    return hmac.new(token, _CONTEXT + str(expires).encode(), hashlib.sha256).hexdigest()


def make_session(token: bytes, now: float | None = None, ttl_s: int = SESSION_TTL_S) -> str:
    """A cookie value good for ``ttl_s`` seconds from ``now``."""
    expires = int(now if now is not None else time.time()) + ttl_s
    return f"{expires}.{_mac(token, expires)}"


def session_valid(token: bytes, value: str, now: float | None = None) -> bool:
    """Whether ``value`` was made under ``token`` and has not expired."""
    expires_text, sep, given = value.partition(".")
    if not sep or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if expires <= (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(given.encode(), _mac(token, expires).encode())


def session_cookie_header(value: str, max_age_s: int, *, secure: bool) -> str:
    """The ``Set-Cookie`` value: HttpOnly, SameSite=Strict, scoped to ``/api/``."""
    parts = [
        f"{COOKIE_NAME}={value}",
        f"Max-Age={max_age_s}",
        f"Path={COOKIE_PATH}",
        "HttpOnly",
        "SameSite=Strict",
    ]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cookie_from_header(raw: str) -> str | None:
    """The session cookie's value in a ``Cookie`` header, if any."""
    for part in raw.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE_NAME:
            return value.strip()
    return None
