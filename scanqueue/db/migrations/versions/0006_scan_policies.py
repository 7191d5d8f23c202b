"""Scan policies: priority, run-after, key, timeout, retries, labels; limits and pauses.

Every new ``scans`` column is nullable or has a constant default, so a plain
``INSERT (id, status, providers_scanned, frameworks_scanned)`` from another
program keeps working, and on PostgreSQL adding them rewrites nothing (a
constant default is stored in the catalogue).  The claim's index gains the
priority in front (built concurrently under a new name, then the old one is
dropped concurrently).  Rows queued before this revision count as unseen: the
next bridge derives their key and sends their ``scan.queued``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online
from scanqueue.db.schema import JSONList, UTCDateTime, utcnow_default

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _new_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("run_after", UTCDateTime, nullable=True),
        sa.Column("scan_key", sa.Text, nullable=True),
        sa.Column("timeout_seconds", sa.Integer, nullable=True),
        sa.Column("retries", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("labels", JSONList, nullable=True),
        sa.Column("effective_key", sa.Text, nullable=True),
        sa.Column("seen_at", UTCDateTime, nullable=True),
    ]


UNDISPATCHED = "status = 'queued' AND dispatched_at IS NULL"
UNSEEN = "status = 'queued' AND seen_at IS NULL"


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = {c["name"] for c in inspector.get_columns("scans")}
    for column in _new_columns():
        if column.name not in existing:
            op.add_column("scans", column)
    if not inspector.has_table("scanqueue_limits"):
        op.create_table(
            "scanqueue_limits",
            sa.Column("key", sa.Text, primary_key=True),
            sa.Column("max_running", sa.Integer, nullable=False),
            sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        )
    if not inspector.has_table("scanqueue_pauses"):
        op.create_table(
            "scanqueue_pauses",
            sa.Column("key", sa.Text, primary_key=True),
            sa.Column("paused_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        )
    create_index_online(
        "scans_claim_order_idx",
        "scans",
        [sa.text("priority DESC"), "created_at", "id"],
        UNDISPATCHED,
    )
    create_index_online("scans_unseen_idx", "scans", ["created_at", "id"], UNSEEN)
    create_index_online("scans_key_created_idx", "scans", ["effective_key", "created_at"])
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.execute(sa.text('DROP INDEX CONCURRENTLY IF EXISTS "scans_undispatched_idx"'))
    else:
        op.drop_index("scans_undispatched_idx", table_name="scans", if_exists=True)


def downgrade() -> None:
    op.create_index(
        "scans_undispatched_idx",
        "scans",
        ["created_at", "id"],
        postgresql_where=sa.text(UNDISPATCHED),
        sqlite_where=sa.text(UNDISPATCHED),
        if_not_exists=True,
    )
    for name in ("scans_claim_order_idx", "scans_unseen_idx", "scans_key_created_idx"):
        op.drop_index(name, table_name="scans", if_exists=True)
    op.drop_table("scanqueue_pauses")
    op.drop_table("scanqueue_limits")
    with op.batch_alter_table("scans") as batch:
        for column in reversed(_new_columns()):
            batch.drop_column(column.name)
