"""A scan's diff as readers see it (``scanqueue diff``, ``GET /api/v1/scans/{id}/diff``).

Read from what :mod:`scanqueue.runners.diff` stored when the scan completed:
the findings' states, the ``fixed`` rows and ``scans.baseline_id``.  Nothing
is recomputed on read, so the diff a reader sees is the one the run wrote
(and the one ``findings --state`` lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scanqueue.db.schema import STATUS_COMPLETED
from scanqueue.errors import ConflictError
from scanqueue.runners.diff import STATE_FIXED, STATE_NEW, STATE_REOPENED, STATE_UNCHANGED
from scanqueue.runners.store import FindingRow, RunnerStore


@dataclass(frozen=True)
class DiffView:
    scan_id: str
    baseline_id: str | None
    new: list[FindingRow]
    fixed: list[FindingRow]
    reopened: list[FindingRow]
    unchanged: int

    def to_json(self) -> dict[str, Any]:
        return {
            "scan_id": self.scan_id,
            "baseline_id": self.baseline_id,
            "new": [f.to_json() for f in self.new],
            "fixed": [f.to_json() for f in self.fixed],
            "reopened": [f.to_json() for f in self.reopened],
            "unchanged": self.unchanged,
        }


def read_diff(rs: RunnerStore, scan_id: str) -> DiffView:
    """The diff stored when ``scan_id`` completed; NotFoundError, or ConflictError if none."""
    scan = rs.store.get(scan_id)  # NotFoundError for an unknown id
    if scan.findings_new is None:
        why = f"it is {scan.status}"
        if scan.status == STATUS_COMPLETED:
            why = "it completed without one (not run by the real runner, or before diffs existed)"
        raise ConflictError(f"scan {scan_id} has no diff: {why}")
    return DiffView(
        scan_id=scan_id,
        baseline_id=scan.baseline_id,
        new=rs.list_findings(scan_id, STATE_NEW),
        fixed=rs.list_findings(scan_id, STATE_FIXED),
        reopened=rs.list_findings(scan_id, STATE_REOPENED),
        unchanged=rs.count_findings(scan_id, STATE_UNCHANGED),
    )
