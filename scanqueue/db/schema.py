"""The tables, as SQLAlchemy Core metadata: the one source for Alembic and the store.

``scans`` is shared with other programs (docs/reference.md#tables): its contract columns are
fixed, and every column scanqueue adds is nullable or has a database default so
that a plain ``INSERT (id, status, providers_scanned, frameworks_scanned)``
keeps working.  Timestamps are written by the database clock, in UTC, with at
least millisecond precision also on SQLite (see :func:`db_now`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

metadata = MetaData()

STATUS_QUEUED = "queued"
STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_CANCELED = "canceled"
STATUSES = (STATUS_QUEUED, STATUS_RUNNING, STATUS_COMPLETED, STATUS_FAILED, STATUS_CANCELED)
FINISHED_STATUSES = (STATUS_COMPLETED, STATUS_FAILED, STATUS_CANCELED)

NOTIFY_CHANNEL = "scanqueue_scans"

# SQLite's CURRENT_TIMESTAMP has whole seconds only; %f gives milliseconds.  Times
# scanqueue compares as text on SQLite are in this one form (UTC).
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%f"
SQLITE_NOW_SQL = f"strftime('{SQLITE_TIME_FORMAT}','now')"


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; naive-UTC text on SQLite; always aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True, precision=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a row written by another program in its own format
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if not isinstance(value, datetime):
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JSONList(TypeDecorator[Any]):
    """jsonb on PostgreSQL, text holding JSON on SQLite.

    Results are returned as stored (a parsed value on PostgreSQL, the raw text
    on SQLite): other programs write these columns, so validation belongs to
    the code that turns a row into a job and can fail just that scan.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB())
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.dumps(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value


class utcnow_default(FunctionElement[datetime]):
    """DDL default 'now' in UTC: ``now()`` on PostgreSQL, millisecond strftime on SQLite."""

    type = UTCDateTime()
    inherit_cache = True
    name = "utcnow_default"


@compiles(utcnow_default, "postgresql")
def _utcnow_pg(element: utcnow_default, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(utcnow_default)
def _utcnow_sqlite(element: utcnow_default, compiler: Any, **kw: Any) -> str:
    return f"({SQLITE_NOW_SQL})"


scans = Table(
    "scans",
    metadata,
    Column("id", Text, primary_key=True),
    Column("status", Text, nullable=False, server_default=text("'queued'")),
    Column("providers_scanned", JSONList, nullable=True),
    Column("frameworks_scanned", JSONList, nullable=True),
    Column("triggered_by_user", Text, nullable=True),
    Column("triggered_by_token", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("error", Text, nullable=True),
    Column("findings_count", Integer, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # scanqueue's own columns: nullable or defaulted, so foreign INSERTs still work.
    Column("dispatched_at", UTCDateTime, nullable=True),
    Column("dispatch_count", Integer, nullable=False, server_default=text("0")),
    Column("heartbeat_at", UTCDateTime, nullable=True),
    Column("worker_id", Text, nullable=True),
    # Scan policies (docs/reference.md#policies): all nullable or defaulted.
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("run_after", UTCDateTime, nullable=True),
    Column("scan_key", Text, nullable=True),
    Column("timeout_seconds", Integer, nullable=True),
    Column("retries", Integer, nullable=False, server_default=text("0")),
    Column("labels", JSONList, nullable=True),
    # The key limits, dedup, pauses and diffs group by: ``scan_key`` or, when that is
    # NULL, derived from the providers and frameworks.  Filled in by whoever inserts
    # through scanqueue, else by the bridge when it first sees the row (``seen_at``,
    # the moment of the scan.queued event).
    Column("effective_key", Text, nullable=True),
    Column("seen_at", UTCDateTime, nullable=True),
    # Findings over time (docs/reference.md#findings-over-time): NULL until the scan's diff is
    # computed
    # (baseline_id: the scan it was compared against; NULL also when there is none).
    Column("findings_new", Integer, nullable=True),
    Column("findings_fixed", Integer, nullable=True),
    Column("baseline_id", Text, nullable=True),
    # Schedules (docs/reference.md#schedules): the schedule that fired the scan and its fire time.
    Column("schedule_name", Text, nullable=True),
    Column("scheduled_for", UTCDateTime, nullable=True),
    # Webhooks (docs/reference.md#findings-over-time): when the leader's fan-out put the finished
    # scan into
    # the outbox (NULL until then).
    Column("notified_at", UTCDateTime, nullable=True),
)

# The bridge's hot path: queued rows not yet handed to the broker, in the claim's
# whole order (higher priority first, then oldest; rows inserted by one statement
# share created_at).  Partial, so finished and dispatched rows never slow it down.
Index(
    "scans_claim_order_idx",
    scans.c.priority.desc(),
    scans.c.created_at,
    scans.c.id,
    postgresql_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_(None),
    sqlite_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_(None),
)
# The same order per key: when the keys at the head of the claim order are full or
# paused, the claim reads the first rows of each key that has room (the keys found by
# a loose scan of this index) instead of walking the backlog past the blocked rows.
Index(
    "scans_key_claim_order_idx",
    scans.c.effective_key,
    scans.c.priority.desc(),
    scans.c.created_at,
    scans.c.id,
    postgresql_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_(None),
    sqlite_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_(None),
)
# Queued rows no bridge has looked at yet (their key to derive, their scan.queued
# event to send).
Index(
    "scans_unseen_idx",
    scans.c.created_at,
    scans.c.id,
    postgresql_where=(scans.c.status == STATUS_QUEUED) & scans.c.seen_at.is_(None),
    sqlite_where=(scans.c.status == STATUS_QUEUED) & scans.c.seen_at.is_(None),
)
# Dedup and the key's history (baselines, retention): scans of one key.
Index("scans_key_created_idx", scans.c.effective_key, scans.c.created_at)
# The baseline: the key's latest completed scan that finished before a time.
Index(
    "scans_key_completed_idx",
    scans.c.effective_key,
    scans.c.finished_at,
    postgresql_where=scans.c.status == STATUS_COMPLETED,
    sqlite_where=scans.c.status == STATUS_COMPLETED,
)
# In flight (the dispatch window's count) and re-sending what the broker lost:
# only dispatched, unstarted rows — at most the window — never the backlog.
Index(
    "scans_queued_dispatched_idx",
    scans.c.dispatched_at,
    postgresql_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_not(None),
    sqlite_where=(scans.c.status == STATUS_QUEUED) & scans.c.dispatched_at.is_not(None),
)
# The reaper: running rows by heartbeat.
Index(
    "scans_running_heartbeat_idx",
    scans.c.heartbeat_at,
    postgresql_where=scans.c.status == STATUS_RUNNING,
    sqlite_where=scans.c.status == STATUS_RUNNING,
)
Index("scans_status_created_idx", scans.c.status, scans.c.created_at)
# The unfiltered newest-first list (``scanqueue list``, the console's poll): read
# backwards, so a page costs the same at 10**3 and 10**6 finished rows.
Index("scans_created_id_idx", scans.c.created_at, scans.c.id)
# One scan per (schedule, fire time), whoever fires it (two leaders, a failover).
Index(
    "scans_schedule_fire_idx",
    scans.c.schedule_name,
    scans.c.scheduled_for,
    unique=True,
    postgresql_where=scans.c.schedule_name.is_not(None),
    sqlite_where=scans.c.schedule_name.is_not(None),
)

# Webhooks' fan-out: finished scans not yet put into the outbox (never the history).
Index(
    "scans_unnotified_idx",
    scans.c.finished_at,
    postgresql_where=scans.c.status.in_(FINISHED_STATUSES) & scans.c.notified_at.is_(None),
    sqlite_where=scans.c.status.in_(FINISHED_STATUSES) & scans.c.notified_at.is_(None),
)
# Retention: the scans of a key that started after a candidate finished (its baseline's users).
Index("scans_key_started_idx", scans.c.effective_key, scans.c.started_at)
# Retention: completed rows no bridge gave a key (written finished by another program).
Index(
    "scans_keyless_idx",
    scans.c.created_at,
    scans.c.id,
    postgresql_where=(scans.c.status == STATUS_COMPLETED) & scans.c.effective_key.is_(None),
    sqlite_where=(scans.c.status == STATUS_COMPLETED) & scans.c.effective_key.is_(None),
)

# Webhooks (docs/reference.md#findings-over-time): receivers, and the durable outbox of their
# deliveries, one
# row per (receiver, scan); ``payload`` is the exact JSON text POSTed on every try,
# ``next_attempt_at`` NULL once delivered or given up (scanqueue/db/webhooks.py).
webhooks = Table(
    "scanqueue_webhooks",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("url", Text, nullable=False, unique=True),
    Column("secret", Text, nullable=False),
    Column("events", Text, nullable=False, server_default=text("'completed,failed,canceled'")),
    Column("only_new_findings", Boolean, nullable=False, server_default=false()),
    Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
)
webhook_deliveries = Table(
    "scanqueue_webhook_deliveries",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("webhook_id", BigInteger, nullable=False),
    Column("scan_id", Text, nullable=False),
    Column("delivery_id", Text, nullable=False, unique=True),
    Column("payload", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("delivered_at", UTCDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
    UniqueConstraint("webhook_id", "scan_id", name="webhook_deliveries_once_uq"),
)
Index(
    "webhook_deliveries_due_idx",
    webhook_deliveries.c.next_attempt_at,
    postgresql_where=webhook_deliveries.c.next_attempt_at.is_not(None),
    sqlite_where=webhook_deliveries.c.next_attempt_at.is_not(None),
)
Index("webhook_deliveries_scan_idx", webhook_deliveries.c.scan_id)

# Recurring scans (docs/reference.md#schedules), fired by the leader bridge: ``cron`` (five fields,
# in ``tz``) or ``every_seconds`` (multiples of it since the Unix epoch).
scan_schedules = Table(
    "scan_schedules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("cron", Text, nullable=True),
    Column("every_seconds", Integer, nullable=True),
    Column("tz", Text, nullable=False, server_default=text("'UTC'")),
    Column("providers", JSONList, nullable=True),
    Column("frameworks", JSONList, nullable=True),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("scan_key", Text, nullable=True),
    Column("on_missed", Text, nullable=False, server_default=text("'once'")),
    Column("on_overlap", Text, nullable=False, server_default=text("'skip'")),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("next_run_at", UTCDateTime, nullable=True),
    Column("last_fired_at", UTCDateTime, nullable=True),
    Column("last_scan_id", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
)

# Live workers and their slots (docs/reference.md#policies): the default dispatch window is twice
# the slots of the workers whose heartbeat is fresh; ``scanqueue queue`` shows them.
workers = Table(
    "scanqueue_workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=True),
    Column("pid", Integer, nullable=True),
    Column("slots", Integer, nullable=False, server_default=text("1")),
    Column("started_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
    Column("heartbeat_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
)

# Per-key concurrency overrides (``scanqueue limits set KEY N``).
key_limits = Table(
    "scanqueue_limits",
    metadata,
    Column("key", Text, primary_key=True),
    Column("max_running", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
)

# Paused keys (``scanqueue pause [KEY]``); PAUSE_ALL stands for the whole queue.
PAUSE_ALL = "*"
pauses = Table(
    "scanqueue_pauses",
    metadata,
    Column("key", Text, primary_key=True),
    Column("paused_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
)

# Leadership without Redis: one lease row per election name.
leader_lease = Table(
    "scanqueue_leader",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=True),
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("expires_at", UTCDateTime, nullable=True),
)

# Events without Redis (docs/reference.md#events): an append-only log a subscriber resumes by id.
events = Table(
    "scanqueue_events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("scan_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False, server_default=utcnow_default()),
    Column("payload", JSONList, nullable=True),
)
Index("scanqueue_events_scan_idx", events.c.scan_id, events.c.id)

# The real runner (docs/reference.md#runner-api): what to scan, which checks are off, what was
# found.
providers = Table(
    "providers",
    metadata,
    Column("name", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("config", JSONList, nullable=True),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
)

checks_state = Table(
    "checks_state",
    metadata,
    Column("check_id", Text, primary_key=True),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("updated_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
)

findings = Table(
    "findings",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("scan_id", Text, nullable=False),
    Column("check_id", Text, nullable=False),
    Column("provider", Text, nullable=False),
    Column("frameworks", JSONList, nullable=True),
    Column("resource", Text, nullable=True),
    Column("severity", Text, nullable=True),
    Column("status", Text, nullable=True),
    Column("title", Text, nullable=True),
    Column("message", Text, nullable=True),
    Column("location", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
    # Findings over time (docs/reference.md#findings-over-time): identity across scans of one key,
    # and the
    # state against the baseline (new, reopened, unchanged, fixed) once computed.
    Column("fingerprint", Text, nullable=True),
    Column("state", Text, nullable=True),
)
Index("findings_scan_idx", findings.c.scan_id, findings.c.id)
# A scan's findings matched against its baseline's; a fingerprint's history.
Index("findings_scan_fingerprint_idx", findings.c.scan_id, findings.c.fingerprint)
Index("findings_fingerprint_idx", findings.c.fingerprint, findings.c.scan_id)
Index("findings_check_created_idx", findings.c.check_id, findings.c.created_at)


def db_now(dialect_name: str) -> ColumnElement[Any]:
    """The database clock as a SQL expression (UTC; milliseconds or better on SQLite)."""
    if dialect_name == "postgresql":
        # clock_timestamp(), not now(): now() is frozen at transaction start.
        return _pg_now
    return _sqlite_now


def db_now_minus(dialect_name: str, seconds: float) -> ColumnElement[Any]:
    """The database clock minus a number of seconds, as a SQL expression."""
    if dialect_name == "postgresql":
        return _literal(f"(clock_timestamp() - make_interval(secs => {float(seconds)!r}))")
    return _literal(f"strftime('%Y-%m-%d %H:%M:%f','now','-{float(seconds)!r} seconds')")


def db_now_plus(dialect_name: str, seconds: float) -> ColumnElement[Any]:
    """The database clock plus a number of seconds, as a SQL expression."""
    if dialect_name == "postgresql":
        return _literal(f"(clock_timestamp() + make_interval(secs => {float(seconds)!r}))")
    return _literal(f"strftime('%Y-%m-%d %H:%M:%f','now','+{float(seconds)!r} seconds')")


def _literal(sql: str) -> ColumnElement[Any]:
    return literal_column(sql, type_=UTCDateTime())


_pg_now = _literal("clock_timestamp()")
_sqlite_now = _literal(SQLITE_NOW_SQL)
