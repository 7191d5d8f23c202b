"""Rows marked claimed without a bridge, for tests that start runs themselves.

Only a claimed scan starts (docs/reference.md#lifecycle): a test that calls
``start_run`` or ``execute_scan``, or sends the Celery task, for a row that no
bridge claimed marks it dispatched first, as the bridge's claim would.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, update

from scanqueue.config import normalize_database_url
from scanqueue.db.schema import STATUS_QUEUED, db_now, scans
from scanqueue.db.store import Store


def mark_dispatched(target: Store | Engine | str, *scan_ids: str) -> None:
    """Set ``dispatched_at`` on the queued rows among ``scan_ids`` (a store, engine or URL)."""
    if isinstance(target, Store):
        _mark(target.engine, scan_ids)
    elif isinstance(target, Engine):
        _mark(target, scan_ids)
    else:
        engine = create_engine(normalize_database_url(target))
        try:
            _mark(engine, scan_ids)
        finally:
            engine.dispose()


def _mark(engine: Engine, scan_ids: tuple[str, ...]) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(scans)
            .where(scans.c.id.in_(list(scan_ids)), scans.c.status == STATUS_QUEUED)
            .values(
                dispatched_at=db_now(engine.dialect.name),
                dispatch_count=scans.c.dispatch_count + 1,
            )
        )
