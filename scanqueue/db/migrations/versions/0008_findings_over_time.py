"""Findings over time: fingerprints, a finding's state against the baseline, per-scan counts.

``findings.fingerprint`` identifies a finding across scans of one key;
``findings.state`` is ``new``, ``reopened``, ``unchanged`` or ``fixed`` once
its scan completed (a ``fixed`` row is a copy of a baseline finding that this
scan no longer found).  ``scans.findings_new`` / ``findings_fixed`` (and
``baseline_id``, the scan compared against) stay NULL until the diff is
computed.  All new columns are nullable, so nothing is rewritten and other
programs' INSERTs keep working.

Indexes (built concurrently on PostgreSQL):

- ``findings_scan_fingerprint_idx`` (scan_id, fingerprint): a scan's findings
  matched against its baseline's;
- ``findings_fingerprint_idx`` (fingerprint, scan_id): was this fingerprint
  seen in an earlier scan of the key (``reopened``);
- ``scans_key_completed_idx`` (effective_key, finished_at) on completed rows:
  the baseline, the key's latest completed scan finished before a time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEXES: tuple[tuple[str, str, list[str], str | None], ...] = (
    ("findings_scan_fingerprint_idx", "findings", ["scan_id", "fingerprint"], None),
    ("findings_fingerprint_idx", "findings", ["fingerprint", "scan_id"], None),
    ("scans_key_completed_idx", "scans", ["effective_key", "finished_at"], "status = 'completed'"),
)


def _columns() -> dict[str, list[sa.Column[Any]]]:
    return {
        "findings": [
            sa.Column("fingerprint", sa.Text, nullable=True),
            sa.Column("state", sa.Text, nullable=True),
        ],
        "scans": [
            sa.Column("findings_new", sa.Integer, nullable=True),
            sa.Column("findings_fixed", sa.Integer, nullable=True),
            sa.Column("baseline_id", sa.Text, nullable=True),
        ],
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, columns in _columns().items():
        existing = {c["name"] for c in inspector.get_columns(table)}
        for column in columns:
            if column.name not in existing:
                op.add_column(table, column)
    for name, table, indexed, where in INDEXES:
        create_index_online(name, table, list(indexed), where)


def downgrade() -> None:
    for name, table, _cols, _where in INDEXES:
        op.drop_index(name, table_name=table, if_exists=True)
    for table, columns in _columns().items():
        with op.batch_alter_table(table) as batch:
            for column in reversed(columns):
                batch.drop_column(column.name)
