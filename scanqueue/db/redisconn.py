"""Redis connections for the leader lock and the event stream (not the broker).

``rediss://`` URLs follow their ``ssl_cert_reqs`` query parameter as Celery
does (``none``/``optional``/``required``, or ``CERT_NONE`` …): hosted Redis
with self-signed certificates works with ``?ssl_cert_reqs=none``.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

SOCKET_TIMEOUT_S = 5.0
HEALTH_CHECK_EVERY_S = 15

_CERT_REQS = {
    "none": "none",
    "cert_none": "none",
    "optional": "optional",
    "cert_optional": "optional",
    "required": "required",
    "cert_required": "required",
}


def ssl_cert_reqs_of(url: str) -> str | None:
    """The URL's certificate policy in redis-py's words, or None if it names none."""
    for key, value in parse_qsl(urlsplit(url).query):
        if key == "ssl_cert_reqs":
            return _CERT_REQS.get(value.lower(), value)
    return None


def ssl_cert_reqs_constant(url: str) -> int | None:
    policy = ssl_cert_reqs_of(url)
    return {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }.get(policy or "")


def redis_client(url: str) -> redis.Redis:
    """A client with bounded socket timeouts, so a dead server is noticed, not waited on."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "ssl_cert_reqs"]
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    kwargs: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_EVERY_S,
        "retry_on_timeout": False,
    }
    if parts.scheme == "rediss":
        # redis-py verifies by default; passing ssl_cert_reqs with redis:// raises TypeError.
        kwargs["ssl_cert_reqs"] = ssl_cert_reqs_of(url) or "required"
    return redis.Redis.from_url(clean, **kwargs)
