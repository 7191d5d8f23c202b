"""Index builds that do not block the host application's writes.

``CREATE INDEX`` takes a SHARE lock on the table for the whole build, so on a
large ``scans`` table that another program writes to, every INSERT waits for
minutes.  On PostgreSQL the migrations build with ``CONCURRENTLY`` instead
(outside a transaction: Alembic's ``autocommit_block``); a concurrent build that
failed half-way (a lock timeout, a cancel) leaves an INVALID index behind,
which is dropped and rebuilt rather than kept because of ``IF NOT EXISTS``.
SQLite builds as usual: its writers are serialized anyway, and its tables are
small.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


def create_index_online(
    name: str,
    table: str,
    columns: Sequence[str | sa.TextClause],
    where: str | None = None,
    *,
    unique: bool = False,
) -> None:
    """Create index ``name`` (``unique``: a UNIQUE one) if missing, concurrently on PostgreSQL."""
    bind = op.get_bind()
    predicate = sa.text(where) if where is not None else None
    if bind.dialect.name != "postgresql":
        op.create_index(
            name, table, list(columns), unique=unique, sqlite_where=predicate, if_not_exists=True
        )
        return
    with op.get_context().autocommit_block():
        valid = (
            op.get_bind()
            .execute(
                sa.text(
                    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                    " WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
                ),
                {"name": name},
            )
            .scalar_one_or_none()
        )
        if valid is False:
            op.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
        op.create_index(
            name,
            table,
            list(columns),
            unique=unique,
            postgresql_where=predicate,
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def replace_index_online(
    name: str, table: str, columns: Sequence[str], where: str | None = None
) -> None:
    """Rebuild index ``name`` with new columns or predicate, without blocking writes.

    PostgreSQL: build under a temporary name concurrently, drop the old one
    concurrently, rename.  Each step is safe to repeat if a run stops half-way.
    """
    building = f"{name}_build"
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(name, table_name=table, if_exists=True)
        predicate = sa.text(where) if where is not None else None
        op.create_index(name, table, list(columns), sqlite_where=predicate)
        return
    create_index_online(building, table, columns, where)
    with op.get_context().autocommit_block():
        op.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
        op.execute(sa.text(f'ALTER INDEX "{building}" RENAME TO "{name}"'))
