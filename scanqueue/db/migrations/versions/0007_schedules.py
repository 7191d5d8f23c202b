"""Schedules (docs/reference.md#schedules): ``scan_schedules``, and which schedule and fire time a
scan is for.

``scan_schedules`` holds one row per schedule (a five-field cron expression in a
zone, or a fixed period in seconds).  ``scans`` gains ``schedule_name`` and
``scheduled_for``, both nullable, so plain-SQL inserts keep working; a UNIQUE
index on the pair is what makes one scan per (schedule, fire time) a database
fact rather than a hope — two leaders firing at once cannot both insert.  On
PostgreSQL the index is partial (only scheduled rows) and built concurrently,
so a large ``scans`` table keeps taking inserts while it builds; SQLite treats
NULLs as distinct in a UNIQUE index anyway.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online
from scanqueue.db.schema import JSONList, UTCDateTime, utcnow_default

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SCHEDULED = "schedule_name IS NOT NULL"
INDEX = "scans_schedule_fire_idx"


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("scan_schedules"):
        op.create_table(
            "scan_schedules",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("cron", sa.Text, nullable=True),
            sa.Column("every_seconds", sa.Integer, nullable=True),
            sa.Column("tz", sa.Text, nullable=False, server_default=sa.text("'UTC'")),
            sa.Column("providers", JSONList, nullable=True),
            sa.Column("frameworks", JSONList, nullable=True),
            sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
            sa.Column("scan_key", sa.Text, nullable=True),
            sa.Column("on_missed", sa.Text, nullable=False, server_default=sa.text("'once'")),
            sa.Column("on_overlap", sa.Text, nullable=False, server_default=sa.text("'skip'")),
            sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column("next_run_at", UTCDateTime, nullable=True),
            sa.Column("last_fired_at", UTCDateTime, nullable=True),
            sa.Column("last_scan_id", sa.Text, nullable=True),
            sa.Column("created_at", UTCDateTime, nullable=False, server_default=utcnow_default()),
        )
    existing = {c["name"] for c in inspector.get_columns("scans")}
    if "schedule_name" not in existing:
        op.add_column("scans", sa.Column("schedule_name", sa.Text, nullable=True))
    if "scheduled_for" not in existing:
        op.add_column("scans", sa.Column("scheduled_for", UTCDateTime, nullable=True))
    create_index_online(INDEX, "scans", ["schedule_name", "scheduled_for"], SCHEDULED, unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="scans", if_exists=True)
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("scheduled_for")
        batch.drop_column("schedule_name")
    op.drop_table("scan_schedules")
