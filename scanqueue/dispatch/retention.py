"""Retention's passes (docs/reference.md#retention): the leader's run_once and ``scanqueue
prune``.

What may go and how rows are deleted is :mod:`scanqueue.db.retention`; this
module walks the candidates in batches (:class:`PrunePass`), pausing between
batches so other writers get the database, and budgets the leader's share:

* the leader calls :meth:`Retention.run_once` on its maintenance tick (about
  once a second).  With ``SCANQUEUE_RETAIN_DAYS`` 0 it does nothing.  A pass
  starts at most every :data:`PASS_EVERY_S`; each tick spends at most
  :data:`TICK_BUDGET_S` on it (one batch of up to 500 scans, usually), and the
  pass goes on at the next tick from where it stopped, so a backlog of 10⁵ old
  scans drains in minutes without stalling the reaper or the schedules.
* ``scanqueue prune`` runs one whole pass at once (``--dry-run``: judged and
  counted, nothing written).

Pass::

    cutoff = db now − days ─▶ batch: candidates after cursor ─▶ keep rules ─▶ delete rest
                                 ▲                                               │
                                 └──────── pause, cursor moves on ◀──────────────┘
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from scanqueue.db.retention import BATCH_SCANS, Cursor, PruneCounts
from scanqueue.db.store import Store

log = logging.getLogger(__name__)

PASS_EVERY_S = 60.0  # the leader starts a new pass at most this often
TICK_BUDGET_S = 0.5  # time one maintenance tick spends pruning, at most (one batch at least)
PAUSE_BETWEEN_BATCHES_S = 0.05  # between batches of one `scanqueue prune` pass

Report = Callable[[PruneCounts], None]


class PrunePass:
    """One walk over the scans finished before ``cutoff``, a batch per :meth:`step`."""

    def __init__(
        self,
        store: Store,
        *,
        older_than_days: float,
        per_key: int,
        dry_run: bool = False,
        batch: int = BATCH_SCANS,
    ) -> None:
        self.store = store
        self.per_key = per_key
        self.dry_run = dry_run
        self.batch = batch
        self.cutoff: datetime = store.retention_cutoff(older_than_days)
        self.cursor: Cursor = None
        self.key_cursor: Cursor = None
        self.keys_filled = dry_run  # a dry run writes nothing, keys included
        self.done = False
        self.counts = PruneCounts()

    def step(self) -> PruneCounts:
        """Judge and delete (or count) one batch; sets :attr:`done` after the last.

        First, one batch at a time, keyless completed scans get their key.
        """
        if not self.keys_filled:
            self.key_cursor = self.store.fill_missing_keys(self.key_cursor, self.batch)
            self.keys_filled = self.key_cursor is None
            return PruneCounts()
        found, self.cursor = self.store.prune_candidates(self.cutoff, self.cursor, self.batch)
        if self.cursor is None:
            self.done = True
        step = PruneCounts()
        if not found:
            return step
        if self.dry_run:
            unkeyed = {c.id for c in found if c.key is None and c.status == "completed"}
            step.unkeyed = len(unkeyed)
            found = [c for c in found if c.id not in unkeyed]
        kept = self.store.kept_candidates(found, self.cutoff, self.per_key)
        doomed = [c.id for c in found if c.id not in kept]
        if self.dry_run:
            step.add(self.store.count_children(doomed))
        else:
            step.add(self.store.delete_scans(doomed))
        step.kept += len(kept)
        self.counts.add(step)
        return step

    def run(self, pause_s: float = PAUSE_BETWEEN_BATCHES_S, report: Report | None = None) -> None:
        """Every batch to the end, pausing ``pause_s`` between them."""
        while not self.done:
            step = self.step()
            if report is not None and not self.dry_run and step.scans:
                report(step)
            if not self.done and pause_s > 0:
                time.sleep(pause_s)


def prune(
    store: Store,
    *,
    older_than_days: float,
    per_key: int,
    dry_run: bool = False,
    pause_s: float = PAUSE_BETWEEN_BATCHES_S,
    report: Report | None = None,
) -> PruneCounts:
    """One whole pass (``scanqueue prune``); returns what went (or would)."""
    run = PrunePass(store, older_than_days=older_than_days, per_key=per_key, dry_run=dry_run)
    run.run(pause_s, report)
    return run.counts


class Retention:
    """The leader's share: a pass now and then, at most :data:`TICK_BUDGET_S` per tick."""

    def __init__(
        self,
        store: Store,
        *,
        days: float,
        per_key: int,
        every_s: float = PASS_EVERY_S,
        budget_s: float = TICK_BUDGET_S,
        report: Report | None = None,
    ) -> None:
        self.store = store
        self.days = days
        self.per_key = per_key
        self.every_s = every_s
        self.budget_s = budget_s
        self.report = report
        self._pass: PrunePass | None = None
        self._last_start = -float("inf")

    def run_once(self) -> PruneCounts:
        """Go on with the current pass (or start one when due) within the budget."""
        total = PruneCounts()
        if self.days <= 0:
            return total
        now = time.monotonic()
        if self._pass is None:
            if now - self._last_start < self.every_s:
                return total
            self._last_start = now
            self._pass = PrunePass(self.store, older_than_days=self.days, per_key=self.per_key)
        deadline = now + self.budget_s
        while True:
            step = self._pass.step()
            total.add(step)
            if self._pass.done:
                if self._pass.counts.scans:
                    log.info(
                        "retention: pruned %d scan(s), %d finding(s), %d event(s) finished"
                        " before %s (kept %d as the last %d of their key or a baseline)",
                        self._pass.counts.scans,
                        self._pass.counts.findings,
                        self._pass.counts.events,
                        self._pass.cutoff.isoformat(),
                        self._pass.counts.kept,
                        self.per_key,
                    )
                self._pass = None
                break
            if time.monotonic() >= deadline:
                break
        if self.report is not None and total.scans:
            self.report(total)
        return total
