"""What watches a run: the observer interface that events, metrics and lineage implement.

The execution path calls an observer after each database transition has
committed; observers never influence the outcome, and a failing observer is
logged and ignored (:class:`SafeObservers`).  Nothing here ever sees the token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from scanqueue.db.rows import FinishedRun, StartedRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """One run of one scan, as observers see it (no token)."""

    scan_id: str
    attempt: int
    providers: list[str]
    frameworks: list[str]
    created_at: datetime | None = None
    started_at: datetime | None = None
    # The start also claimed the next scan and sent its message (worker/successor.py):
    # the dispatch window is as full as before, nothing for a bridge to refill.
    successor_sent: bool = False

    @classmethod
    def from_started(cls, started: StartedRun, *, successor_sent: bool = False) -> RunInfo:
        return cls(
            scan_id=started.scan_id,
            attempt=started.attempt,
            providers=_strings(started.providers_raw),
            frameworks=_strings(started.frameworks_raw),
            created_at=started.created_at,
            started_at=started.started_at,
            successor_sent=successor_sent,
        )

    @property
    def pickup_latency_s(self) -> float | None:
        if self.created_at is None or self.started_at is None:
            return None
        return max(0.0, (self.started_at - self.created_at).total_seconds())


def _strings(raw: Any) -> list[str]:
    from scanqueue.db.rows import decode_json

    value = decode_json(raw)
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


class ScanObserver(Protocol):
    def started(self, run: RunInfo) -> None: ...

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None: ...

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None: ...

    def discarded(self, run: RunInfo, duration_s: float) -> None: ...

    # Optional: ``canceled(run, duration_s)``, for a run whose scan was canceled;
    # the execution path falls back to ``discarded`` for an observer without it.


class NullObserver:
    def started(self, run: RunInfo) -> None:
        pass

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        pass

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        pass

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        pass


NULL_OBSERVER: ScanObserver = NullObserver()


class SafeObservers:
    """Fans out to several observers; one that raises is logged and skipped."""

    def __init__(self, observers: list[ScanObserver]) -> None:
        self.observers = observers

    def _each(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("observer %s.%s failed", type(observer).__name__, method)

    def started(self, run: RunInfo) -> None:
        self._each("started", run)

    def event(self, run: RunInfo, event_type: str, payload: dict[str, Any]) -> None:
        self._each("event", run, event_type, payload)

    def finished(self, run: RunInfo, row: FinishedRun, duration_s: float) -> None:
        self._each("finished", run, row, duration_s)

    def discarded(self, run: RunInfo, duration_s: float) -> None:
        self._each("discarded", run, duration_s)

    def canceled(self, run: RunInfo, duration_s: float) -> None:
        """A run whose scan was canceled (optional hook; ``discarded`` where missing)."""
        for observer in self.observers:
            hook = getattr(observer, "canceled", None)
            try:
                (hook if callable(hook) else observer.discarded)(run, duration_s)
            except Exception:
                log.exception("observer %s.canceled failed", type(observer).__name__)
