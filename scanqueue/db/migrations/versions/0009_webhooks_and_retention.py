"""Webhooks from a durable outbox, and what retention needs (docs/reference.md#webhooks).

- ``scanqueue_webhooks``: one row per receiver (``url`` unique, its HMAC
  ``secret``, the statuses it wants in ``events``, ``only_new_findings``).
- ``scanqueue_webhook_deliveries``: the outbox.  One row per (receiver, scan),
  made by the leader's fan-out in the same transaction that marks the scan
  notified; ``delivery_id`` (the ``X-Scanqueue-Delivery`` header) is unique, and
  so is (webhook_id, scan_id), so a fan-out that runs twice makes nothing twice.
  ``payload`` is the exact JSON text POSTed (the same bytes on every retry);
  ``next_attempt_at`` is NULL once the row is delivered or given up.
- ``scans.notified_at``: when the fan-out handled a finished scan (NULL until
  then), with the partial index ``scans_unnotified_idx`` on finished rows not
  yet notified, so the fan-out never reads the history.
- ``scans_key_started_idx`` (effective_key, started_at): which scans of a key
  started after a candidate for pruning finished (whose baseline it is);
  ``scans_keyless_idx`` (created_at, id), partial: completed rows without a key
  (written finished by another program), which retention fills in first.

All new ``scans`` columns are nullable, so other programs' INSERTs keep
working; indexes on ``scans`` are built concurrently on PostgreSQL.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online
from scanqueue.db.schema import UTCDateTime, utcnow_default

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FINISHED_NOT_NOTIFIED = "status IN ('completed', 'failed', 'canceled') AND notified_at IS NULL"
KEYLESS_COMPLETED = "status = 'completed' AND effective_key IS NULL"
INDEXES: tuple[tuple[str, str, list[str], str | None], ...] = (
    ("scans_unnotified_idx", "scans", ["finished_at"], FINISHED_NOT_NOTIFIED),
    ("scans_key_started_idx", "scans", ["effective_key", "started_at"], None),
    ("scans_keyless_idx", "scans", ["created_at", "id"], KEYLESS_COMPLETED),
)


def _id_column() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    )


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("scanqueue_webhooks"):
        op.create_table(
            "scanqueue_webhooks",
            _id_column(),
            sa.Column("url", sa.Text, nullable=False, unique=True),
            sa.Column("secret", sa.Text, nullable=False),
            sa.Column(
                "events",
                sa.Text,
                nullable=False,
                server_default=sa.text("'completed,failed,canceled'"),
            ),
            sa.Column("only_new_findings", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        )
    if not inspector.has_table("scanqueue_webhook_deliveries"):
        op.create_table(
            "scanqueue_webhook_deliveries",
            _id_column(),
            sa.Column("webhook_id", sa.BigInteger, nullable=False),
            sa.Column("scan_id", sa.Text, nullable=False),
            sa.Column("delivery_id", sa.Text, nullable=False, unique=True),
            sa.Column("payload", sa.Text, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
            sa.Column("next_attempt_at", UTCDateTime, nullable=True),
            sa.Column("delivered_at", UTCDateTime, nullable=True),
            sa.Column("last_error", sa.Text, nullable=True),
            sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
            sa.UniqueConstraint("webhook_id", "scan_id", name="webhook_deliveries_once_uq"),
        )
        op.create_index(
            "webhook_deliveries_due_idx",
            "scanqueue_webhook_deliveries",
            ["next_attempt_at"],
            postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
            sqlite_where=sa.text("next_attempt_at IS NOT NULL"),
        )
        op.create_index("webhook_deliveries_scan_idx", "scanqueue_webhook_deliveries", ["scan_id"])
    existing = {c["name"] for c in inspector.get_columns("scans")}
    if "notified_at" not in existing:
        op.add_column("scans", sa.Column("notified_at", UTCDateTime, nullable=True))
    for name, table, indexed, where in INDEXES:
        create_index_online(name, table, list(indexed), where)


def downgrade() -> None:
    for name, table, _cols, _where in INDEXES:
        op.drop_index(name, table_name=table, if_exists=True)
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("notified_at")
    op.drop_table("scanqueue_webhook_deliveries")
    op.drop_table("scanqueue_webhooks")
