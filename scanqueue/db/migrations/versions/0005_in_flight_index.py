"""The in-flight index holds only dispatched, unstarted rows.

The dispatch window counts ``status = 'queued' AND dispatched_at IS NOT NULL``
on every claim (and, while the window is full, many times a second).  The old
``scans_queued_dispatched_idx`` also held every undispatched queued row (NULL
``dispatched_at``), so with a large backlog and stale statistics PostgreSQL
counted through all of them: 16 ms a count at 7·10**4 queued rows.  Now the
index holds at most the window (plus dead entries until vacuum).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from scanqueue.db.migrations.online import replace_index_online

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    replace_index_online(
        "scans_queued_dispatched_idx",
        "scans",
        ["dispatched_at"],
        "status = 'queued' AND dispatched_at IS NOT NULL",
    )


def downgrade() -> None:
    pass  # the narrower index serves older code's queries (they all name dispatched_at)
