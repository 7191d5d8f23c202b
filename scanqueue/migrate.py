"""``scanqueue db upgrade``: run the Alembic migrations on the configured database.

Idempotent and safe to run on every deploy; on PostgreSQL an advisory lock
serialises two release steps that start at once.
"""

from __future__ import annotations

import logging
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from .store import Store

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = 0x5CA9_0E0E  # any constant; names scanqueue's migration lock
VERSION_TABLE = "scanqueue_alembic_version"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "scanqueue:migrations")
    return cfg


def upgrade(store: Store, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to ``revision``; returns (before, after) revisions."""
    store.ping()
    cfg = alembic_config()
    with store.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Index builds on a large adopted table may take longer than the
            # runtime statement timeout.
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SET LOCAL lock_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        before = current_revision_on(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = current_revision_on(conn)
    return before, after


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
