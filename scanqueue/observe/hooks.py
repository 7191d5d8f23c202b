"""The hooks through which a bridge reports what it sees (depth, leadership,
dispatches, reaped runs); :mod:`scanqueue.observe.metrics` fills them.

Defined here, below the bridge, so that metrics need not import the bridge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scanqueue.db.rows import ReapedScan


@dataclass
class BridgeHooks:
    """Where the bridge reports what it sees (metrics); all optional."""

    queue_depth: Callable[[int], None] | None = None
    leader: Callable[[bool], None] | None = None
    dispatched: Callable[[int], None] | None = None
    reaped: Callable[[int, int], None] | None = None  # requeued, failed
    lost_runs: Callable[[Sequence[ReapedScan]], None] | None = None  # each reaped run
    # schedule.fired / schedule.skipped: (event type, scan id, payload)
    schedule_event: Callable[[str, str, Mapping[str, Any]], object] | None = None
