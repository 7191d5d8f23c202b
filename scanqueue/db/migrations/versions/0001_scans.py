"""scans (created, or adopted from another program), leader lease, events, NOTIFY trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online
from scanqueue.db.schema import NOTIFY_CHANNEL, JSONList, UTCDateTime, utcnow_default

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _scan_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'queued'")),
        sa.Column("providers_scanned", JSONList, nullable=True),
        sa.Column("frameworks_scanned", JSONList, nullable=True),
        sa.Column("triggered_by_user", sa.Text, nullable=True),
        sa.Column("triggered_by_token", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("findings_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("dispatched_at", UTCDateTime, nullable=True),
        sa.Column("dispatch_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("heartbeat_at", UTCDateTime, nullable=True),
        sa.Column("worker_id", sa.Text, nullable=True),
    ]


def _adopt_scans(existing: set[str]) -> None:
    """Add what an existing scans table lacks; never touch what it has."""
    missing = [c for c in _scan_columns() if c.name not in existing]
    for column in missing:
        if column.primary_key:
            raise RuntimeError("existing scans table has no 'id' column; cannot adopt it")
        # A NOT NULL column added to a table with rows needs a default; ours all have one.
        assert column.nullable or column.server_default is not None, column.name
    if not missing:
        return
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # SQLite cannot ADD COLUMN with a non-constant default: recreate the table.
        with op.batch_alter_table("scans", recreate="always") as batch:
            for column in missing:
                batch.add_column(column)
    else:
        for column in missing:
            op.add_column("scans", column)


def _create_indexes() -> None:
    # Concurrently on PostgreSQL: adopting a host application's large, busy scans
    # table must not block its writes for the length of four index builds.
    undispatched = "status = 'queued' AND dispatched_at IS NULL"
    create_index_online("scans_undispatched_idx", "scans", ["created_at"], undispatched)
    create_index_online(
        "scans_queued_dispatched_idx", "scans", ["dispatched_at"], "status = 'queued'"
    )
    create_index_online(
        "scans_running_heartbeat_idx", "scans", ["heartbeat_at"], "status = 'running'"
    )
    create_index_online("scans_status_created_idx", "scans", ["status", "created_at"])


def _create_notify_trigger() -> None:
    # One NOTIFY per transaction: identical payloads in one transaction are folded.
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION scanqueue_notify_queued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute("DROP TRIGGER IF EXISTS scanqueue_scans_queued ON scans")
    op.execute(
        """
        CREATE TRIGGER scanqueue_scans_queued
        AFTER INSERT OR UPDATE OF status ON scans
        FOR EACH ROW WHEN (NEW.status = 'queued')
        EXECUTE FUNCTION scanqueue_notify_queued()
        """
    )


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if inspector.has_table("scans"):
        _adopt_scans({c["name"] for c in inspector.get_columns("scans")})
    else:
        op.create_table("scans", *_scan_columns())
    _create_indexes()
    if bind.dialect.name == "postgresql":
        _create_notify_trigger()

    op.create_table(
        "scanqueue_leader",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("expires_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "scanqueue_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("scan_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        sa.Column("payload", JSONList, nullable=True),
    )
    op.create_index("scanqueue_events_scan_idx", "scanqueue_events", ["scan_id", "id"])


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_table("scanqueue_events")
    op.drop_table("scanqueue_leader")
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS scanqueue_scans_queued ON scans")
        op.execute("DROP FUNCTION IF EXISTS scanqueue_notify_queued()")
    # scans is shared with other programs: it is never dropped by scanqueue.
