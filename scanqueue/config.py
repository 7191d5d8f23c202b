"""Settings: the environment of docs/reference.md#environment, read once, validated, frozen.

``Settings.from_env()`` turns environment variables into a typed, immutable
object or raises :class:`ConfigError` naming the variable.  Every default is a
named constant carrying its unit.  URLs are normalised here (``postgres://``
means psycopg2) and masked by :func:`mask_url` wherever they are shown.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from scanqueue.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///scanqueue.db"
DEFAULT_CONCURRENCY = 2
DEFAULT_EXTRA_CONCURRENCY = 4  # the old Go pool: max = concurrency + 4
DEFAULT_POLL_EVERY_S = 0.5
DEFAULT_RUNNER = "scanqueue:StubRunner"
DEFAULT_LEASE_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CANCEL_GRACE_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 0  # runner failures retried per scan (docs/reference.md#policies)
DEFAULT_RETRY_BACKOFF_S = 10.0  # the backoff's base: base × 2^retries, jittered, ≤ 1 h
DEFAULT_SCAN_TIMEOUT_S = 0.0  # 0: a run may take as long as it likes
DEFAULT_METRICS_PORT = 0
DEFAULT_BROKER_POLL_EVERY_S = 0.1  # kombu's SQL transport polls; 1 s (its default) doubles pickup
DEFAULT_DISPATCH_BATCH = 100
DEFAULT_DISPATCH_WINDOW = 0  # 0: twice the live workers' slots, at least 4 (bridge.py)
DEFAULT_MAX_RUNNING_PER_KEY = 0  # scans of one key running at once; 0: no limit
DEFAULT_LOG_FORMAT = "text"
DEFAULT_QUEUE = "scanqueue"
# The one Celery task: the bridge publishes it by name, the worker registers it.
TASK_NAME = "scanqueue.run_scan"
DEFAULT_LEADER_TTL_S = 15.0  # a standby takes over within one TTL of the leader's death
DEFAULT_REDISPATCH_AFTER_S = 30.0
DEFAULT_EVENTS_MAXLEN = 100_000  # events kept in the Redis stream or the table
MIN_LEASE_S = 2.0
DEFAULT_SSE_MAX_SUBSCRIBERS = 100  # open event streams per serve process; past it 503
DEFAULT_RETAIN_DAYS = 0.0  # days a finished scan is kept (docs/reference.md#retention); 0: for ever
DEFAULT_RETAIN_PER_KEY = 10  # completed scans of each key never pruned, however old

# Every SCANQUEUE_* variable scanqueue reads (docs/reference.md#environment and the tuning knobs
# documented beside the code that reads them).  Anything else with the prefix is
# warned about, with the closest of these names: a typo must not be silently
# ignored.  Add a name here when you add a variable.
KNOWN_VARIABLES = frozenset(
    {
        "SCANQUEUE_API_INSECURE",
        "SCANQUEUE_API_TOKEN",
        "SCANQUEUE_AUTOSCALE_GROW_AFTER",
        "SCANQUEUE_AUTOSCALE_SAMPLE_EVERY",
        "SCANQUEUE_AUTOSCALE_SOURCE",
        "SCANQUEUE_AUTOSCALE_THRESHOLD",
        "SCANQUEUE_AUTOSCALE_TICK",
        "SCANQUEUE_BROKER_POLL_EVERY",
        "SCANQUEUE_CANCEL_GRACE_SECONDS",
        "SCANQUEUE_CONCURRENCY",
        "SCANQUEUE_CONNECT_TIMEOUT",
        "SCANQUEUE_DISPATCH_BATCH",
        "SCANQUEUE_DISPATCH_WINDOW",
        "SCANQUEUE_EVENTS_MAXLEN",
        "SCANQUEUE_IMAGE",  # docker/compose.yaml's image name
        "SCANQUEUE_LEADER_TTL",
        "SCANQUEUE_LEASE_SECONDS",
        "SCANQUEUE_LOG_FORMAT",
        "SCANQUEUE_MAX_ATTEMPTS",
        "SCANQUEUE_MAX_CONCURRENCY",
        "SCANQUEUE_MAX_RETRIES",
        "SCANQUEUE_MAX_RUNNING_PER_KEY",
        "SCANQUEUE_METRICS_ADDR",
        "SCANQUEUE_METRICS_PORT",
        "SCANQUEUE_POLL_EVERY",
        "SCANQUEUE_QUEUE",
        "SCANQUEUE_REDISPATCH_AFTER",
        "SCANQUEUE_RETAIN_DAYS",
        "SCANQUEUE_RETAIN_PER_KEY",
        "SCANQUEUE_RETRY_BACKOFF",
        "SCANQUEUE_RUNNER",
        "SCANQUEUE_SCAN_TIMEOUT",
        "SCANQUEUE_SSE_MAX_SUBSCRIBERS",
        "SCANQUEUE_STUB_SECONDS",
    }
)
# Reserved for scanqueue's own test suite and scripts (tests/conftest.py, scripts/).
RESERVED_PREFIXES = ("SCANQUEUE_TEST_",)

_ENCODE_HINT = " (a password holding / # ? @ or : must be percent-encoded, e.g. @ as %40)"
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
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    scan_timeout_s: float = DEFAULT_SCAN_TIMEOUT_S
    metrics_port: int = DEFAULT_METRICS_PORT
    broker_poll_every_s: float = DEFAULT_BROKER_POLL_EVERY_S
    dispatch_batch: int = DEFAULT_DISPATCH_BATCH
    dispatch_window: int = DEFAULT_DISPATCH_WINDOW
    max_running_per_key: int = DEFAULT_MAX_RUNNING_PER_KEY
    log_format: str = DEFAULT_LOG_FORMAT
    queue: str = DEFAULT_QUEUE
    leader_ttl_s: float = DEFAULT_LEADER_TTL_S
    redispatch_after_s: float = DEFAULT_REDISPATCH_AFTER_S
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN
    lineage_enabled: bool = False
    api_token: str | None = field(default=None, repr=False)
    api_insecure: bool = False
    sse_max_subscribers: int = DEFAULT_SSE_MAX_SUBSCRIBERS
    retain_days: float = DEFAULT_RETAIN_DAYS
    retain_per_key: int = DEFAULT_RETAIN_PER_KEY

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
            max_retries=_int(env, "SCANQUEUE_MAX_RETRIES", DEFAULT_MAX_RETRIES, minimum=0),
            retry_backoff_s=_float(
                env, "SCANQUEUE_RETRY_BACKOFF", DEFAULT_RETRY_BACKOFF_S, minimum=0
            ),
            scan_timeout_s=_float(env, "SCANQUEUE_SCAN_TIMEOUT", DEFAULT_SCAN_TIMEOUT_S, minimum=0),
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
            max_running_per_key=_int(
                env, "SCANQUEUE_MAX_RUNNING_PER_KEY", DEFAULT_MAX_RUNNING_PER_KEY, minimum=0
            ),
            log_format=log_format,
            api_token=_text(env, "SCANQUEUE_API_TOKEN"),
            api_insecure=_bool(env, "SCANQUEUE_API_INSECURE", False),
            sse_max_subscribers=_int(
                env, "SCANQUEUE_SSE_MAX_SUBSCRIBERS", DEFAULT_SSE_MAX_SUBSCRIBERS, minimum=1
            ),
            retain_days=_days(env, "SCANQUEUE_RETAIN_DAYS", DEFAULT_RETAIN_DAYS),
            retain_per_key=_int(env, "SCANQUEUE_RETAIN_PER_KEY", DEFAULT_RETAIN_PER_KEY, minimum=0),
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


def unknown_variable_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per ``SCANQUEUE_*`` variable scanqueue does not know, naming the closest."""
    env = os.environ if environ is None else environ
    lines = []
    for name in sorted(env):
        if not name.startswith("SCANQUEUE_") or name in KNOWN_VARIABLES:
            continue
        if name.startswith(RESERVED_PREFIXES):
            continue
        # Spelling alone would take SCANQUEUE_MAX_WORKERS for MAX_RETRIES; say what it means.
        wanted = name
        for word, meant in _SYNONYMS.items():
            wanted = wanted.replace(word, meant)
        closest = difflib.get_close_matches(wanted, sorted(KNOWN_VARIABLES), n=1, cutoff=0.0)
        hint = f" (did you mean {closest[0]}?)" if closest else ""
        lines.append(f"warning: unknown variable {name} is ignored{hint}")
    return lines


_warned_unknown = False
_SYNONYMS = {"WORKERS": "CONCURRENCY", "PROCESSES": "CONCURRENCY", "THREADS": "CONCURRENCY"}


def warn_unknown_variables(
    environ: Mapping[str, str] | None = None, emit: Callable[[str], None] | None = None
) -> None:
    """Print the warnings of :func:`unknown_variable_warnings` once per process.

    Every entry point calls this (the CLI group, the Celery app, hence the worker);
    ``emit`` defaults to one ``scanqueue: …`` line on stderr, since logging may not
    be configured yet.
    """
    global _warned_unknown
    if _warned_unknown:
        return
    _warned_unknown = True
    for line in unknown_variable_warnings(environ):
        if emit is not None:
            emit(line)
        else:
            print(f"scanqueue: {line}", file=sys.stderr)


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
    except ArgumentError:
        raise ConfigError(variable, f"not a database URL: {mask_url(raw)}") from None
    except ValueError:  # make_url calls int() on the port
        raise ConfigError(
            variable, f"the port must be a number in {mask_url(raw)}{_ENCODE_HINT}"
        ) from None
    if url.port is not None and not 0 < url.port <= 65535:
        raise ConfigError(variable, f"the port must be from 1 to 65535 in {mask_url(raw)}")
    if "@" in (url.database or "") or "@" in (url.host or ""):
        # "u:p@ss/w@host/db": the password's '/' made everything after it the database.
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}{_ENCODE_HINT}")
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


# What a URL's user name may hold (RFC 3986 userinfo without ':'); anything else
# before the first ':' means the password itself is malformed.
_USER_NAME = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=]*")
_USER_IS_PASSWORD_SCHEMES = ("redis", "rediss", "unix", "amqp", "amqps", "sentinel")
# A query parameter whose name holds one of these is a secret (?password=, ?token=,
# ?sslkey=…).  Its value is hidden to the end of the string: an unencoded password
# may hold '&', '#' or '@', so no later character can be trusted to end it.
_SECRET_QUERY = re.compile(r"[?&][^=&]*?(?:pass|secret|token|key)[^=&]*=(.*)", re.I | re.S)


def mask_url(raw: str) -> str:
    """The URL with its password (and any password-like query value) replaced by ``***``.

    This never trusts a URL parser: a password may hold ``/``, ``#``, ``?`` or ``@``
    unencoded, and the port may be garbage, which makes ``urlsplit`` put the
    password into the path or the fragment.  Instead two kinds of region of the
    raw string are hidden, and where they overlap, their union:

    - the password: everything from the first ``:`` after ``://`` (or the whole
      user part for ``redis://secret@host``) to the **last** ``@`` of the string;
    - from the value of the first query parameter whose name looks secret to the
      end (so ``?password=a&b@c`` does not fool the ``@`` rule).

    When the last ``@`` is really in the path or query this hides more than needed
    (the host too), never less.  Control characters are escaped so the result
    stays on one line.
    """
    hidden: list[tuple[int, int]] = []
    scheme_end = raw.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else raw.find(":") + 1
    scheme = raw[: max(scheme_end, 0)].lower()
    at = raw.rfind("@")
    if at >= start > 0 and not scheme.startswith("sqlite"):
        userinfo = raw[start:at]
        colon = userinfo.find(":")
        if scheme_end < 0:
            hidden.append((start, at))  # "scheme:user:pass@host": hide it all
        elif colon >= 0 and _USER_NAME.fullmatch(userinfo[:colon]):
            hidden.append((start + colon + 1, at))  # keep the user name
        elif colon >= 0:
            hidden.append((start, at))  # not a user name: part of a malformed password
        elif scheme.startswith(_USER_IS_PASSWORD_SCHEMES) or any(c in userinfo for c in "/?#"):
            # redis://secret@host puts the password where the user goes; anything else
            # with / ? # before the @ is malformed, so hide it all.
            hidden.append((start, at))
    for match in _SECRET_QUERY.finditer(raw):
        hidden.append(match.span(1))
    out: list[str] = []
    pos = 0
    for begin, finish in sorted(hidden):
        if finish <= pos:
            continue
        begin = max(begin, pos)
        if begin > pos or not out:
            out.append(raw[pos:begin])
            out.append("***")
        pos = finish
    out.append(raw[pos:])
    return _one_line("".join(out))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _text(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


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


def _days(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number of days, got {raw!r}") from None
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ConfigError(name, f"must be a finite number of days of at least 0, got {raw!r}")
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
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}{_ENCODE_HINT}") from None
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}{_ENCODE_HINT}")
    if not parts.scheme or "://" not in raw:
        raise ConfigError(variable, f"malformed URL {mask_url(raw)}")
    return parts


# What separates the end of a fenced run (fence + grace) from the moment its lease
# can expire: a share of the lease, at most FENCE_MARGIN_MAX_S.  It absorbs the
# watchdog's wake-up latency and the time to send the run's last lineage event.
FENCE_MARGIN_SHARE = 0.1
FENCE_MARGIN_MAX_S = 1.0


def fence_margin_s(lease_s: float) -> float:
    return min(FENCE_MARGIN_MAX_S, lease_s * FENCE_MARGIN_SHARE)


def self_fence_after_s(lease_s: float, cancel_grace_s: float) -> float:
    """How long a run may go without renewing its lease before it is told to stop.

    Counted from the moment the last successful heartbeat was *sent* (the row's
    ``heartbeat_at`` is never earlier), so fence + grace + margin = lease: the
    run's process is gone before the reaper can see the lease as expired.
    """
    return lease_s - cancel_grace_s - fence_margin_s(lease_s)


def check_fence(lease_s: float, cancel_grace_s: float, heartbeat_every_s: float) -> None:
    """ConfigError (naming the grace) unless fence + grace end before the lease.

    The fence must also leave room for at least one heartbeat, or a single
    failed call would stop every run.
    """
    fence = self_fence_after_s(lease_s, cancel_grace_s)
    if fence < heartbeat_every_s:
        raise ConfigError(
            "SCANQUEUE_CANCEL_GRACE_SECONDS",
            f"{cancel_grace_s:g}s leaves no time to self-fence within SCANQUEUE_LEASE_SECONDS="
            f"{lease_s:g}s (fence + grace + {fence_margin_s(lease_s):g}s margin must fit in the"
            f" lease, with the fence at least one heartbeat, {heartbeat_every_s:g}s); use a grace"
            f" of at most {lease_s - fence_margin_s(lease_s) - heartbeat_every_s:g}s or a longer"
            " lease",
        )
