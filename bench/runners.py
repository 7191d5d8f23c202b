"""Runners for the benchmark (``SCANQUEUE_RUNNER=bench.runners:noop``).

``noop`` does nothing and reports nothing: what is left of a scan's cost is
scanqueue's own (claim, publish, compare-and-set start and finish, events).
"""

from __future__ import annotations

from scanqueue import Job, ScanContext


def noop(job: Job, ctx: ScanContext) -> None:
    """Complete at once with zero findings."""
    return None
