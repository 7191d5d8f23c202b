"""scanqueue: compliance scans recorded in a ``scans`` table, run by Celery workers.

The public surface is the Runner API (docs/reference.md#runner-api) and :func:`enqueue` (how a
host application queues a scan, docs/reference.md#policies).  The Celery app lives in
:mod:`scanqueue.worker.app` (``celery -A scanqueue`` finds it there), so importing
this package for ``Job`` or ``ScanContext`` does not start Celery.
"""

from __future__ import annotations

from typing import Any

from scanqueue.runners.api import (
    Job,
    PermanentError,
    RetryLater,
    Runner,
    RunnerFunc,
    ScanContext,
    ScanResult,
    StubRunner,
)

__all__ = [
    "EnqueueResult",
    "InvalidScanRequest",
    "Job",
    "PermanentError",
    "RetryLater",
    "Runner",
    "RunnerFunc",
    "ScanContext",
    "ScanResult",
    "ScanRunner",
    "StubRunner",
    "enqueue",
]


def __getattr__(name: str) -> Any:
    # The real runner pulls in its providers only when asked for.
    if name == "ScanRunner":
        from scanqueue.runners.real import ScanRunner

        return ScanRunner
    # Enqueueing from Python (docs/reference.md#policies) loads the store only when asked for.
    if name in ("enqueue", "EnqueueResult"):
        from scanqueue.db import producer

        return getattr(producer, name)
    if name == "InvalidScanRequest":
        from scanqueue.db.scan_request import InvalidScanRequest

        return InvalidScanRequest
    raise AttributeError(f"module 'scanqueue' has no attribute {name!r}")
