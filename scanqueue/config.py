"""Settings: the environment of CONTRACT §1, read once, validated, frozen.

``Settings.from_env()`` turns environment variables into a typed, immutable
object or raises :class:`ConfigError` naming the variable.  Every default is a
named constant carrying its unit.  URLs are normalised here (``postgres://``
means psycopg2) and masked by :func:`mask_url` wherever they are shown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///scanqueue.db"
DEFAULT_CONCURRENCY = 2
DEFAULT_EXTRA_CONCURRENCY = 4  # the old Go pool: max = concurrency + 4
DEFAULT_POLL_EVERY_S = 0.5
DEFAULT_RUNNER = "scanqueue.runner:StubRunner"
DEFAULT_LEASE_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CANCEL_GRACE_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 60.0
DEFAULT_METRICS_PORT = 0
DEFAULT_BROKER_POLL_EVERY_S = 0.1  # kombu's SQL transport polls; 1 s (its default) doubles pickup
DEFAULT_DISPATCH_BATCH = 100
DEFAULT_DISPATCH_WINDOW = 0  # 0: twice the live workers' slots, at least 4 (bridge.py)
DEFAULT_LOG_FORMAT = "text"
DEFAULT_QUEUE = "scanqueue"
DEFAULT_LEADER_TTL_S = 15.0  # a standby takes over within one TTL of the leader's death
DEFAULT_REDISPATCH_AFTER_S = 30.0
DEFAULT_EVENTS_MAXLEN = 100_000  # events kept in the Redis stream or the table
MIN_LEASE_S = 2.0

_POSTGRES_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg2"}
_REDIS_SCHEMES = {"redis", "rediss", "unix"}


@dataclass(frozen=True)
class Settings:
    """Everything scanqueue reads from the environment, validated."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    broker_url: str = ""
    concurrency: int = DEFAULT_CONCURRENCY
    max_concurrency: int = DEFAULT_CONCURRENCY + DEFAULT_EXTRA_CONCURRENCY
    poll_every_s: float = DEFAULT_POLL_EVERY_S
    runner: str = DEFAULT_RUNNER
    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    metrics_port: int = DEFAULT_METRICS_PORT
    broker_poll_every_s: float = DEFAULT_BROKER_POLL_EVERY_S
    dispatch_batch: int = DEFAULT_DISPATCH_BATCH
    dispatch_window: int = DEFAULT_DISPATCH_WINDOW
    log_format: str = DEFAULT_LOG_FORMAT
    queue: str = DEFAULT_QUEUE
    leader_ttl_s: float = DEFAULT_LEADER_TTL_S
    redispatch_after_s: float = DEFAULT_REDISPATCH_AFTER_S
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN
    lineage_enabled: bool = False
    api_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment; raise ConfigError naming the variable."""
        env = os.environ if environ is None else environ
        database_url = normalize_database_url(
            _text(env, "DATABASE_URL") or DEFAULT_DATABASE_URL, "DATABASE_URL"
        )
        redis_url = _text(env, "REDIS_URL")
        if redis_url is not None:
            _check_redis_url(redis_url, "REDIS_URL")
        broker_url = _text(env, "CELERY_BROKER_URL")
        if broker_url is not None:
            _check_generic_url(broker_url, "CELERY_BROKER_URL")
        else:
            broker_url = redis_url or embedded_broker_url(database_url)
        concurrency = _int(env, "SCANQUEUE_CONCURRENCY", DEFAULT_CONCURRENCY, minimum=1)
        max_concurrency = _int(
            env,
            "SCANQUEUE_MAX_CONCURRENCY",
            concurrency + DEFAULT_EXTRA_CONCURRENCY,
            minimum=1,
        )
        if max_concurrency < concurrency:
            raise ConfigError(
                "SCANQUEUE_MAX_CONCURRENCY",
                f"{max_concurrency} is below SCANQUEUE_CONCURRENCY ({concurrency})",
            )
        runner = _text(env, "SCANQUEUE_RUNNER") or DEFAULT_RUNNER
        if ":" not in runner or not all(runner.split(":", 1)):
            raise ConfigError("SCANQUEUE_RUNNER", f"expected 'module:attribute', got {runner!r}")
        log_format = (_text(env, "SCANQUEUE_LOG_FORMAT") or DEFAULT_LOG_FORMAT).lower()
        if log_format not in ("text", "json"):
            raise ConfigError(
                "SCANQUEUE_LOG_FORMAT", f"expected 'text' or 'json', got {log_format!r}"
            )
        queue = _text(env, "SCANQUEUE_QUEUE") or DEFAULT_QUEUE
        if not all(c.isalnum() or c in "-_.:" for c in queue):
            raise ConfigError("SCANQUEUE_QUEUE", f"letters, digits and -_.: only, got {queue!r}")
        # A run whose lease is in doubt must be stopped and terminated before the lease
        # can pass to another worker: a grace that leaves no room for that is an error.
        from .execute import check_fence  # the fence's arithmetic lives with the fence

        fence_lease_s = _float(env, "SCANQUEUE_LEASE_SECONDS", DEFAULT_LEASE_S, minimum=MIN_LEASE_S)
        check_fence(
            fence_lease_s,
            _float(env, "SCANQUEUE_CANCEL_GRACE_SECONDS", DEFAULT_CANCEL_GRACE_S, minimum=0),
            min(fence_lease_s / 3.0, 2.0),  # heartbeat_every_s
        )
        return cls(
            queue=queue,
            events_maxlen=_int(env, "SCANQUEUE_EVENTS_MAXLEN", DEFAULT_EVENTS_MAXLEN, minimum=1),
            lineage_enabled=lineage_configured(env),
            leader_ttl_s=_float(env, "SCANQUEUE_LEADER_TTL", DEFAULT_LEADER_TTL_S, minimum=1.0),
            redispatch_after_s=_float(
                env, "SCANQUEUE_REDISPATCH_AFTER", DEFAULT_REDISPATCH_AFTER_S, minimum=0.5
            ),
            database_url=database_url,
            redis_url=redis_url,
            broker_url=broker_url,
            concurrency=concurrency,
            max_concurrency=max_concurrency,
            poll_every_s=_float(env, "SCANQUEUE_POLL_EVERY", DEFAULT_POLL_EVERY_S, minimum=0.01),
            runner=runner,
            lease_s=_float(env, "SCANQUEUE_LEASE_SECONDS", DEFAULT_LEASE_S, minimum=MIN_LEASE_S),
            max_attempts=_int(env, "SCANQUEUE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, minimum=1),
            cancel_grace_s=_float(
                env, "SCANQUEUE_CANCEL_GRACE_SECONDS", DEFAULT_CANCEL_GRACE_S, minimum=0
            ),
            connect_timeout_s=_float(
                env, "SCANQUEUE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S, minimum=0
            ),
            metrics_port=_int(
                env, "SCANQUEUE_METRICS_PORT", DEFAULT_METRICS_PORT, minimum=0, maximum=65535
            ),
            broker_poll_every_s=_float(
                env, "SCANQUEUE_BROKER_POLL_EVERY", DEFAULT_BROKER_POLL_EVERY_S, minimum=0.01
            ),
            dispatch_batch=_int(env, "SCANQUEUE_DISPATCH_BATCH", DEFAULT_DISPATCH_BATCH, minimum=1),
            dispatch_window=_int(
                env, "SCANQUEUE_DISPATCH_WINDOW", DEFAULT_DISPATCH_WINDOW, minimum=0
            ),
            log_format=log_format,
            api_token=_text(env, "SCANQUEUE_API_TOKEN"),
        )

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def heartbeat_every_s(self) -> float:
        """How often a running scan renews its lease and looks for a cancel."""
        return min(self.lease_s / 3.0, 2.0)

    @property
    def reap_every_s(self) -> float:
        return max(self.lease_s / 3.0, 0.5)


def lineage_configured(env: Mapping[str, str]) -> bool:
    """Whether the OpenLineage client's own configuration is present (and not disabled)."""
    if (env.get("OPENLINEAGE_DISABLED") or "").strip().lower() == "true":
        return False
    return bool(
        (env.get("OPENLINEAGE_URL") or "").strip()
        or (env.get("OPENLINEAGE_CONFIG") or "").strip()
        or any(k.startswith("OPENLINEAGE__TRANSPORT__") for k in env)
    )


def normalize_database_url(raw: str, variable: str = "DATABASE_URL") -> str:
    """Return a SQLAlchemy URL; ``postgres://``/``postgresql://`` mean psycopg2."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(variable, f"not a database URL: {mask_url(raw)}") from exc
    if url.drivername in _POSTGRES_SCHEMES:
        url = url.set(drivername="postgresql+psycopg2")
    elif url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(
            variable,
            f"unsupported database {url.drivername!r} in {mask_url(raw)}"
            " (use postgresql:// or sqlite:///)",
        )
    return url.render_as_string(hide_password=False)


def embedded_broker_url(database_url: str) -> str:
    """The SQLite broker file beside the SQLite database (or in the cwd for PostgreSQL)."""
    url = make_url(database_url)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        db_path = Path(url.database)
        broker_path = db_path.with_name(db_path.stem + "-broker.db")
    else:
        broker_path = Path("scanqueue-broker.db")
    return f"sqla+sqlite:///{broker_path.resolve()}"


def mask_url(raw: str) -> str:
    """The URL with its password (and any password-like query value) replaced by ***."""
    try:
        parts = urlsplit(raw)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if not netloc and "pass" not in parts.query.lower() and "secret" not in parts.query.lower():
        return raw  # sqlite:///file: nothing to hide (urlunsplit would drop the slashes)
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        elif userinfo and parts.scheme.startswith(("redis", "rediss", "amqp")):
            userinfo = "***"  # redis://secret@host puts the password where the user goes
        netloc = f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{k}=***" if "pass" in k.lower() or "secret" in k.lower() else f"{k}={v}"
            for k, v in pairs
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _int(
    env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(name, f"must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number of seconds, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):  # also rejects NaN
        raise ConfigError(name, f"must be a finite number of at least {minimum}, got {raw!r}")
    return value


def _check_redis_url(raw: str, variable: str) -> None:
    parts = _check_generic_url(raw, variable)
    if parts.scheme not in _REDIS_SCHEMES:
        raise ConfigError(variable, f"expected redis://, rediss:// or unix://, got {mask_url(raw)}")


def _check_generic_url(raw: str, variable: str) -> SplitResult:
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}") from None
    if not parts.scheme or "://" not in raw:
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}")
    return parts
