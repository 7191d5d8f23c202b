"""Intake: what a bridge does with a queued row the first time it sees it
(docs/reference.md#policies).

Whoever inserted the row (scanqueue, or another program with a plain INSERT),
the bridge derives its key from the stored columns — parsed and validated as
the Runner API parses them (:meth:`scanqueue.runners.api.Job.from_stored`) —
and sends ``scan.queued``; a row whose stored data is malformed is failed at
once with the reason and sends ``scan.failed``, never stranded.  The statements
run just before the claim (:meth:`scanqueue.db.store.Store.claim_within_window`;
on PostgreSQL the well-formed rows are keyed in SQL, the same way, and only the
rest come here); the events go through
the event sink in the background, batched, so pickup barely moves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from scanqueue.config import Settings
from scanqueue.db.keys import effective_key
from scanqueue.db.policies import Intake
from scanqueue.runners.api import Job

log = logging.getLogger(__name__)

OnIntake = Callable[[Sequence[Intake]], None]


def derive_key(scan_key: str | None, providers_raw: Any, frameworks_raw: Any) -> str:
    """The row's effective key; raises MalformedRowError naming the bad column."""
    job = Job.from_stored("", providers_raw, frameworks_raw)
    return effective_key(scan_key, job.providers_scanned, job.frameworks_scanned)


def intake_events(settings: Settings) -> OnIntake:
    """``scan.queued`` per row taken in (``scan.failed`` per malformed one), never raising."""
    from scanqueue.observe.event_sender import background_emitter_for
    from scanqueue.observe.event_sinks import event_sink_for

    def on_intake(taken: Sequence[Intake]) -> None:
        for row in taken:
            if row.error is not None:
                log.warning("scan %s failed at intake: %s", row.scan_id, row.error)
        try:
            emitter = background_emitter_for(event_sink_for(settings))
        except Exception as exc:
            log.warning("scan.queued events for %d scan(s) dropped: %s", len(taken), exc)
            return
        for row in taken:
            if row.error is None:
                emitter.emit("scan.queued", row.scan_id, {"key": row.key})
            else:
                emitter.emit("scan.failed", row.scan_id, {"error": row.error})

    return on_intake
