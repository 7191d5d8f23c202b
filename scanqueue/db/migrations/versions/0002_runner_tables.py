"""providers, checks_state and findings for the real runner.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.schema import JSONList, UTCDateTime, utcnow_default

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("providers"):
        op.create_table(
            "providers",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("config", JSONList, nullable=True),
            sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("created_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
        )
    if not inspector.has_table("checks_state"):
        op.create_table(
            "checks_state",
            sa.Column("check_id", sa.Text, primary_key=True),
            sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("updated_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
        )
    if not inspector.has_table("findings"):
        op.create_table(
            "findings",
            sa.Column(
                "id",
                sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                primary_key=True,
                autoincrement=True,
            ),
            sa.Column("scan_id", sa.Text, nullable=False),
            sa.Column("check_id", sa.Text, nullable=False),
            sa.Column("provider", sa.Text, nullable=False),
            sa.Column("frameworks", JSONList, nullable=True),
            sa.Column("resource", sa.Text, nullable=True),
            sa.Column("severity", sa.Text, nullable=True),
            sa.Column("status", sa.Text, nullable=True),
            sa.Column("title", sa.Text, nullable=True),
            sa.Column("message", sa.Text, nullable=True),
            sa.Column("location", sa.Text, nullable=True),
            sa.Column("created_at", UTCDateTime, nullable=True, server_default=utcnow_default()),
        )
    op.create_index("findings_scan_idx", "findings", ["scan_id", "id"], if_not_exists=True)
    op.create_index(
        "findings_check_created_idx", "findings", ["check_id", "created_at"], if_not_exists=True
    )


def downgrade() -> None:
    # The tables stay: they may have been adopted from a host application's
    # database, and an older scanqueue simply does not use them.
    op.drop_index("findings_check_created_idx", table_name="findings", if_exists=True)
    op.drop_index("findings_scan_idx", table_name="findings", if_exists=True)
