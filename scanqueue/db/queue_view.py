"""What ``scanqueue queue`` and ``GET /api/v1/queue`` show: one JSON object
(docs/reference.md#policies).

``depth`` (queued rows), ``oldest_queued_age_s``, ``statuses`` (rows per status,
``unknown`` summing the values scanqueue does not know, which are also listed
by value and sampled by id), ``paused_all`` and ``pauses``, ``default_limit``
(``SCANQUEUE_MAX_RUNNING_PER_KEY``, 0 = none), ``keys`` (per key: running, in
flight, the limit that applies and whether it is paused) and ``workers`` (the
live ones: slots and last heartbeat).  Every part is a bounded query.
"""

from __future__ import annotations

from typing import Any

from scanqueue.db.rows import iso
from scanqueue.db.schema import PAUSE_ALL, STATUSES
from scanqueue.db.store import Store

UNKNOWN_SAMPLE = 20  # ids of unknown-status rows shown


def queue_snapshot(store: Store, default_limit: int, stale_after_s: float) -> dict[str, Any]:
    counts = store.count_by_status()
    statuses = {status: counts.get(status, 0) for status in STATUSES}
    unknown = {status: n for status, n in sorted(counts.items()) if status not in STATUSES}
    statuses["unknown"] = sum(unknown.values())
    pauses = store.pauses()
    return {
        "depth": statuses["queued"],
        "oldest_queued_age_s": round(store.oldest_queued_age_s(), 3),
        "statuses": statuses,
        "unknown_statuses": unknown,
        "unknown_rows": [
            {"id": scan_id, "status": status}
            for scan_id, status in (
                store.rows_with_unknown_status(UNKNOWN_SAMPLE) if unknown else []
            )
        ],
        "paused_all": any(p["key"] == PAUSE_ALL for p in pauses),
        "pauses": [
            {"key": None if p["key"] == PAUSE_ALL else p["key"], "paused_at": iso(p["paused_at"])}
            for p in pauses
        ],
        "default_limit": default_limit,
        "keys": store.key_activity(default_limit),
        "workers": [
            {
                "id": w["id"],
                "hostname": w["hostname"],
                "pid": w["pid"],
                "slots": w["slots"],
                "started_at": iso(w["started_at"]),
                "heartbeat_at": iso(w["heartbeat_at"]),
            }
            for w in store.live_workers(stale_after_s)
        ],
    }
