"""Live workers (for the dispatch window) and the newest-first list index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online
from scanqueue.db.schema import UTCDateTime, utcnow_default

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("scanqueue_workers"):
        op.create_table(
            "scanqueue_workers",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("hostname", sa.Text, nullable=True),
            sa.Column("pid", sa.Integer, nullable=True),
            sa.Column("slots", sa.Integer, nullable=False, server_default=sa.text("1")),
            sa.Column("started_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
            sa.Column("heartbeat_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        )
    # Built concurrently on PostgreSQL: scans may be a host application's busy table.
    create_index_online("scans_created_id_idx", "scans", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("scans_created_id_idx", table_name="scans", if_exists=True)
    op.drop_table("scanqueue_workers")
