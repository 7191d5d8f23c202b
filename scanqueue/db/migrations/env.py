"""Alembic environment: always online, on the connection scanqueue hands over."""

from __future__ import annotations

from alembic import context

from scanqueue.db.schema import metadata

VERSION_TABLE = "scanqueue_alembic_version"  # a host program may have its own alembic_version

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    # One transaction per revision: a revision that builds an index CONCURRENTLY
    # (outside any transaction) commits what came before it, and a lock timeout
    # retried by scanqueue.db.migrate repeats only the revision that hit it.
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
