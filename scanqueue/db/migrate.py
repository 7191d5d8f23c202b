"""``scanqueue db upgrade``: run the Alembic migrations on the configured database.

Idempotent and safe to run on every deploy; on PostgreSQL an advisory lock
serialises two release steps that start at once.

Adopting a large, busy ``scans`` table must not stall the host application's
writes (PostgreSQL): indexes are built ``CONCURRENTLY`` (see
:mod:`scanqueue.db.migrations.online`), and every DDL statement waits at most
``MIGRATION_LOCK_TIMEOUT_MS`` for its table lock — an ``ALTER TABLE`` queued
behind a long transaction would otherwise queue every INSERT behind itself.  A
revision that timed out is rolled back and retried with backoff.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from scanqueue.db.engine import make_engine
from scanqueue.db.store import Store

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = 0x5CA9_0E0E  # any constant; names scanqueue's migration lock
VERSION_TABLE = "scanqueue_alembic_version"
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "scanqueue.db:migrations")
    return cfg


MIGRATION_LOCK_TIMEOUT_MS = 3_000
MIGRATION_LOCK_RETRIES = 20
MIGRATION_RETRY_DELAY_MAX_S = 10.0


def upgrade(store: Store, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to ``revision``; returns (before, after) revisions."""
    store.ping()
    cfg = alembic_config()
    # An engine of its own, disposed at the end: the session settings below must
    # not leak into the store's pooled connections.
    engine = make_engine(store.database_url)
    try:
        with engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                # Index builds on a large adopted table may take longer than the
                # runtime statement timeout; lock waits stay short (retried below).
                conn.execute(text("SET statement_timeout = 0"))
                conn.execute(text(f"SET lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}"))
                # Session-level, not transaction-level: each revision commits on its own.
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            before = current_revision_on(conn)
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                _with_lock_retries(conn, lambda: command.upgrade(cfg, revision))
                after = current_revision_on(conn)
                conn.commit()
            finally:
                if postgres:
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                    conn.commit()
    finally:
        engine.dispose()
    return before, after


def _with_lock_retries(conn: Any, step: Any) -> None:
    """Run ``step``; on a PostgreSQL lock timeout roll back and retry, bounded."""
    delay = 0.5
    for attempt in range(1, MIGRATION_LOCK_RETRIES + 1):
        try:
            step()
            return
        except sa_exc.OperationalError as exc:
            if getattr(getattr(exc, "orig", None), "pgcode", None) != LOCK_NOT_AVAILABLE:
                raise
            conn.rollback()
            if attempt == MIGRATION_LOCK_RETRIES:
                raise
            log.warning(
                "db upgrade: a table lock was not granted within %d ms (attempt %d);"
                " retrying in %.1fs",
                MIGRATION_LOCK_TIMEOUT_MS,
                attempt,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, MIGRATION_RETRY_DELAY_MAX_S)


def downgrade(store: Store, revision: str) -> tuple[str | None, str | None]:
    """Step the schema back to ``revision`` (never drops the shared ``scans`` table)."""
    store.ping()
    cfg = alembic_config()
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        before = current_revision_on(conn)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        after = current_revision_on(conn)
    return before, after


def current_revision_on(conn: Any) -> str | None:
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


def current_revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return current_revision_on(conn)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
