"""The one Celery task: run the scan whose id the message carries.

A thin wrapper around :func:`scanqueue.worker.execute.execute_scan`.  The message
carries only the scan id (never the token); everything else is read from the
database when the run starts.  A message is a start token: it starts its scan, or
a dispatched scan of higher priority in its place (docs/reference.md#lifecycle).
"""

from __future__ import annotations

import logging
from typing import Any

from scanqueue.config import TASK_NAME
from scanqueue.errors import UnavailableError
from scanqueue.worker.app import app, settings
from scanqueue.worker.execute import execute_scan
from scanqueue.worker.runtime import worker_runtime

log = logging.getLogger(__name__)

DB_RETRY_DELAY_S = 5
DB_MAX_RETRIES = 12


@app.task(  # type: ignore[untyped-decorator]
    name=TASK_NAME,
    bind=True,
    autoretry_for=(UnavailableError,),
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=DB_MAX_RETRIES,
    default_retry_delay=DB_RETRY_DELAY_S,
)
def run_scan(self: Any, scan_id: object) -> str:
    """Start the run this message is a token for (compare-and-set); return its outcome."""
    if not isinstance(scan_id, str) or not scan_id.strip():
        log.error("rejected a message whose scan id is not a non-empty string: %r", scan_id)
        return "rejected"
    rt = worker_runtime(settings)
    outcome = execute_scan(
        scan_id,
        store=rt.store,
        runner=rt.runner,
        settings=rt.execution,
        observer=rt.observer,
        successors=rt.successors,
    )
    return outcome.value
