"""A start's successor: the scan a start claims to keep the dispatch window full.

With short scans the window (twice the slots: 4 at ``-c 2``) drains between a
bridge's refills: a start signals the embedded bridge, which claims and publishes
once half the window is free, and a pool process that finishes meanwhile waits for
its next message.  So on PostgreSQL a pool process starts its scan with a statement
that also claims the scan the bridge would claim next, and sends that scan's
message itself, right after the start commits: one scan leaves the window and one
enters it, in one statement, with no bridge round in between (River and Oban fold
their bookkeeping into the state change the same way).  The statement
(:meth:`scanqueue.db.runs.RunsMixin.start_run` with a
:class:`~scanqueue.db.rows.SuccessorWindow`) claims only what needs none of the
claim's judgement — no pause, no per-key limit, the next row already taken in, the
window not over its size — and leaves everything else to the bridges.

This module owns the pool process's side: whether this worker asks for successors
(:func:`successors_for`: PostgreSQL, an embedded bridge, whose settings the pool
processes share, and no default per-key limit) and sending the message
(:meth:`Successors.send_early`: written before the run, the broker's answer read
after its end), while its runs are short enough for a bridge's refill to lag behind
them (:data:`SHORT_RUN_S`).  A message that cannot be sent is released for the
bridge's next claim, which the start signal (or, when the answer shows it late,
:attr:`Successors.wake`) then wakes; if even the release fails, or the pool process
dies before it sent it, the leader's re-dispatch sends it after
``SCANQUEUE_REDISPATCH_AFTER``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from scanqueue.config import Settings
from scanqueue.db.engine import describe_db_error
from scanqueue.db.rows import SuccessorWindow
from scanqueue.db.store import Store
from scanqueue.errors import ScanqueueError

log = logging.getLogger(__name__)


# A run at least this long gives the bridge time to refill the window after its start
# signal (a claim and a publish take a few ms), so the next start asks for no
# successor: the longer statement and the message would cost that run about 1 ms
# (2 % of a 50 ms scan) and buy nothing.
SHORT_RUN_S = 0.02


class Successors:
    """Sends the message of a scan this process's start claimed, at once.

    In the pool process, before the run.  Handing it to a thread of its own instead
    kept the run from waiting, but cost more CPU than it saved on a busy machine
    (bench/README.md).  Instead, where the publisher can (``publish`` returns a
    call that reads the broker's answer: the Redis broker's short way), the message
    is written before the run and the answer read after it (:meth:`send_early`), so
    the round trip overlaps the run.  A process asks for a successor only while its
    runs are short (:meth:`wanted`, :data:`SHORT_RUN_S`).
    """

    def __init__(
        self,
        store: Store,
        window: SuccessorWindow,
        publish: Callable[[Sequence[str]], Callable[[], None] | None],
        report: Callable[[int], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.window = window
        self.publish = publish
        self.report = report
        # What tells the bridge that a start left room in the window: called when a
        # message sent early turns out not to have gone (the start said it had).
        self.wake = wake
        self._last_run_s = 0.0  # a process's first start asks for one

    def wanted(self) -> SuccessorWindow | None:
        """The window to judge a successor by, when this start should claim one."""
        return self.window if self._last_run_s < SHORT_RUN_S else None

    def ran(self, duration_s: float) -> None:
        """How long this process's last run took (from its start to its end)."""
        self._last_run_s = duration_s

    def send_early(self, scan_id: str) -> SentSuccessor:
        """Write ``scan_id``'s message; :meth:`SentSuccessor.settle` (which must follow,
        on every path) reads whether it went, and if not releases the scan and wakes
        the bridge."""
        try:
            settle = self.publish([scan_id])
        except Exception as exc:
            self._release(scan_id, exc)
            return SentSuccessor(self, scan_id, None, failed=True)
        return SentSuccessor(self, scan_id, settle)

    def _release(self, scan_id: str, exc: Exception) -> None:
        log.warning(
            "cannot send the message of scan %s (claimed by a start): %s; released for"
            " the bridge's next claim",
            scan_id,
            describe_db_error(exc),
        )
        try:
            self.store.release_dispatch([scan_id])
        except ScanqueueError as release_exc:
            log.warning(
                "cannot release scan %s either (%s); the leader sends it again",
                scan_id,
                release_exc,
            )


class SentSuccessor:
    """A successor's message, written; whether it went is known once settled."""

    def __init__(
        self,
        successors: Successors,
        scan_id: str,
        settle: Callable[[], None] | None,
        *,
        failed: bool = False,
    ) -> None:
        self._successors = successors
        self.scan_id = scan_id
        self._settle = settle
        self._failed = failed
        self._outcome: bool | None = None

    @property
    def failed_at_once(self) -> bool:
        """It could not even be written: the scan is released already, and the start
        signal (the run's ``successor_sent`` is false) wakes the bridge."""
        return self._failed

    def settle(self) -> bool:
        """Read the broker's answer (once); False when the message did not go, and the
        scan was released for the bridge (woken here when the failure shows only now)."""
        if self._outcome is not None:
            return self._outcome
        owner = self._successors
        ok = not self._failed
        if ok and self._settle is not None:
            try:
                self._settle()
            except Exception as exc:
                owner._release(self.scan_id, exc)
                ok = False
                if owner.wake is not None:
                    owner.wake()
        if ok and owner.report is not None:
            owner.report(1)
        self._outcome = ok
        return ok


def successors_for(settings: Settings, store: Store) -> Successors | None:
    """This pool process's successor sender, or None where starts claim no successor."""
    from scanqueue.dispatch.wake import installed_start_signal, notify_started

    if not settings.is_postgres or installed_start_signal() is None:
        return None
    if settings.max_running_per_key > 0:
        return None  # every claim judges the default limit: the bridge's
    from scanqueue.dispatch.bridge import MIN_WINDOW, WINDOW_PER_SLOT, WORKER_STALE_AFTER_S
    from scanqueue.dispatch.publish import make_publisher
    from scanqueue.observe.metrics import report_dispatched
    from scanqueue.worker.app import app

    window = SuccessorWindow(
        fixed=settings.dispatch_window,
        minimum=MIN_WINDOW,
        per_slot=WINDOW_PER_SLOT,
        stale_after_s=WORKER_STALE_AFTER_S,
    )
    return Successors(
        store, window, make_publisher(app).send_early, report_dispatched, notify_started
    )
