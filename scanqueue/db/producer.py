"""``scanqueue.enqueue``: how a host application enqueues a scan from Python
(docs/reference.md#policies).

The same options and the same validation as ``scanqueue enqueue`` and
``POST /api/v1/scans`` (:func:`scanqueue.db.scan_request.validate_scan_request`),
instead of hand-written SQL::

    import scanqueue

    result = scanqueue.enqueue(
        "postgresql://app@db/app",          # or a SQLAlchemy Engine
        providers=["aws"], frameworks=["soc2"],
        priority=10, key="acct-1234", labels={"team": "payments"}, unique=True,
    )
    result.id, result.deduplicated, result.scan.status

Bad values raise :class:`~scanqueue.db.scan_request.InvalidScanRequest`
(``.details`` names every bad field).  The token is stored, never returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from scanqueue.db.rows import ScanRow
from scanqueue.db.scan_request import validate_scan_request
from scanqueue.db.store import Store, store_for


@dataclass(frozen=True)
class EnqueueResult:
    """The queued scan, and whether it was an existing one (``unique=True``)."""

    scan: ScanRow
    deduplicated: bool

    @property
    def id(self) -> str:
        return self.scan.id


_engine_stores: dict[int, Store] = {}


def _store_of(engine_or_url: Engine | str) -> Store:
    if isinstance(engine_or_url, str):
        from scanqueue.config import normalize_database_url

        return store_for(normalize_database_url(engine_or_url))
    found = _engine_stores.get(id(engine_or_url))
    if found is None or found.engine is not engine_or_url:
        url = engine_or_url.url.render_as_string(hide_password=False)
        found = _engine_stores[id(engine_or_url)] = Store(url, engine_or_url)
    return found


def enqueue(
    engine_or_url: Engine | str,
    *,
    providers: Sequence[str],
    frameworks: Sequence[str] = (),
    user: str | None = None,
    token: str | None = None,
    priority: int | None = None,
    key: str | None = None,
    run_after: datetime | str | None = None,
    timeout_seconds: int | None = None,
    labels: Mapping[str, str] | None = None,
    unique: bool = False,
) -> EnqueueResult:
    """Insert a queued scan (or, with ``unique``, return the key's queued one)."""
    body: dict[str, Any] = {
        "providers": list(providers),
        "frameworks": list(frameworks),
        "user": user,
        "priority": priority,
        "key": key,
        "run_after": run_after,
        "timeout_seconds": timeout_seconds,
        "labels": dict(labels) if labels is not None else None,
        "unique": unique,
    }
    request = validate_scan_request(body)
    row, deduplicated = _store_of(engine_or_url).enqueue_request(request, token=token)
    return EnqueueResult(row, deduplicated)
