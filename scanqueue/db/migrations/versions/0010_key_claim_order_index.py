"""The claim under per-key limits stays flat with the backlog: a per-key claim-order index.

``scans_key_claim_order_idx`` (effective_key, priority DESC, created_at, id), partial
on queued rows not yet dispatched, like ``scans_claim_order_idx`` with the key in
front.  When the keys at the head of the claim order are full or paused, the claim
no longer walks the backlog past their rows: it finds the queued keys with a loose
index scan and reads the first rows of each key that has room
(docs/reference.md#policies).  Indexes only; built concurrently on PostgreSQL.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from scanqueue.db.migrations.online import create_index_online

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

NAME = "scans_key_claim_order_idx"
UNDISPATCHED = "status = 'queued' AND dispatched_at IS NULL"


def upgrade() -> None:
    create_index_online(
        NAME,
        "scans",
        ["effective_key", sa.text("priority DESC"), "created_at", "id"],
        UNDISPATCHED,
    )


def downgrade() -> None:
    op.drop_index(NAME, table_name="scans", if_exists=True)
