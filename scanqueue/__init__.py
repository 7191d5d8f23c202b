"""scanqueue: compliance scans recorded in a ``scans`` table, run by Celery workers.

The public surface is the Runner API (CONTRACT §3).  The Celery app lives in
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
    "Job",
    "PermanentError",
    "RetryLater",
    "Runner",
    "RunnerFunc",
    "ScanContext",
    "ScanResult",
    "ScanRunner",
    "StubRunner",
]


def __getattr__(name: str) -> Any:
    # The real runner pulls in its providers only when asked for.
    if name == "ScanRunner":
        from scanqueue.runners.real import ScanRunner

        return ScanRunner
    raise AttributeError(f"module 'scanqueue' has no attribute {name!r}")
