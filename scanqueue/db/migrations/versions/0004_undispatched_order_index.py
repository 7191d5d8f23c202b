"""The claim's index covers its whole order, ``(created_at, id)``.

Rows inserted in one statement share ``created_at`` (PostgreSQL's ``now()`` is
the transaction's start), so an index on ``created_at`` alone left the claim to
sort every undispatched row by ``id`` on each claim: 46 ms, spilling to disk,
with a 10**5-row backlog.  Built concurrently on PostgreSQL under a temporary
name, then swapped in.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NAME = "scans_undispatched_idx"
BUILDING = "scans_undispatched_build_idx"
WHERE = "status = 'queued' AND dispatched_at IS NULL"
COLUMNS = ["created_at", "id"]


def _columns(name: str) -> list[str] | None:
    for index in sa.inspect(op.get_bind()).get_indexes("scans"):
        if index["name"] == name:
            return [str(c) for c in index["column_names"]]
    return None


def upgrade() -> None:
    if _columns(NAME) == COLUMNS:
        return
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(NAME, table_name="scans", if_exists=True)
        op.create_index(NAME, "scans", COLUMNS, sqlite_where=sa.text(WHERE))
        return
    create_index_online(BUILDING, "scans", COLUMNS, WHERE)
    with op.get_context().autocommit_block():
        op.execute(sa.text(f'DROP INDEX CONCURRENTLY IF EXISTS "{NAME}"'))
        op.execute(sa.text(f'ALTER INDEX "{BUILDING}" RENAME TO "{NAME}"'))


def downgrade() -> None:
    pass  # the wider index serves older code just as well
