"""The bridge: queued rows in ``scans`` become broker messages carrying the scan id.

It is handed a ``publish`` callable and never imports Celery.  Two loops, each
a ``run_once`` plus a thin loop that only waits, stops and logs:

* dispatch — on **every** live bridge, woken by the watcher (NOTIFY or poll):
  takes in rows it has not seen (their key, ``scan.queued``;
  :mod:`scanqueue.dispatch.intake`), claims undispatched queued rows by
  priority then age under the scan policies (run-after, pauses, per-key
  limits), never more than the dispatch window allows, and publishes them.
  Pickup is not gated on a leader (as in
  River, Solid Queue, Oban): claims are serialized in the database (see
  :meth:`Store.claim_within_window`), so the window stays exact however many
  bridges claim, and when one dies the others go on claiming at once — no
  lock TTL to wait out.
* maintenance — every second: renew or contest leadership; refresh the live
  workers' slots (the window's default); as leader only, reap orphaned runs,
  re-send scans whose messages the broker lost, fire due schedules
  (:mod:`scanqueue.dispatch.schedules`) and run the leader tasks plugged in by
  :mod:`scanqueue.dispatch.service` — webhooks (:mod:`scanqueue.dispatch.webhooks`)
  and retention (:mod:`scanqueue.dispatch.retention`); on every replica, refresh
  the queue-depth gauge.

Per scan::

    queued ──claim (room in window)──▶ queued+dispatched ──worker CAS──▶ running
      ▲  (waits in the table while       │  │
      │   the window is full)            │  └─ lost/overtaken ─▶ re-sent (leader)
      └── publish failed, or swapped out ┘
           for a higher priority: released

Per bridge::

    dispatch:    wait for NOTIFY/poll ─▶ drain ─▶ window full? ─yes─▶ look again
                      ▲                     │                    in 10–100 ms
                      └────────── no ───────┘
    maintenance: follower ──leadership won──▶ leader (reap, re-send)
                    ▲                            │
                    └────── leadership lost ◀────┘

**The window** (docs/reference.md#policies) bounds scans dispatched but not started:
``SCANQUEUE_DISPATCH_WINDOW``, or by default twice the slots of the live
workers (``scanqueue_workers`` rows with a fresh heartbeat), at least
:data:`MIN_WINDOW`.  The broker never holds the backlog, and a bridge's memory
does not grow with it.  A later row of higher priority does not wait for room:
while the window is full of lower priorities, the claim *swaps* — it claims the
higher ones and releases as many of the lowest dispatched scans (queued again;
their messages, stale, start nothing of theirs), and a worker's next start takes
the best dispatched scan.  A scan that *starts* frees room without notifying
anyone, so while the window is full the dispatch loop looks again every 10 ms,
backing off to 100 ms while no room appears; each look also sees whether a
waiting scan outranks the lowest in flight.

**Re-sending** (leader): a dispatched scan that has not started is re-sent
after ``SCANQUEUE_REDISPATCH_AFTER`` seconds (backing off per re-send), or
after only :data:`LOST_AFTER_S` when there is evidence its message is gone —
a scan dispatched later already runs (overtaken), or slots are free.  Unlike
before the window, this never waits for the broker queue to empty, which under
steady load never happens.  A duplicate costs nothing: the task's
compare-and-set absorbs it.

A claim that could not be published is released at once, so the next pass
retries it.  Correctness never rests on the bridge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from scanqueue.config import DEFAULT_REDISPATCH_AFTER_S
from scanqueue.db.policies import DeriveKey, Intake
from scanqueue.db.store import Store
from scanqueue.dispatch.leader import Leadership
from scanqueue.dispatch.schedules import fire_due_once
from scanqueue.dispatch.watch import Watcher
from scanqueue.errors import ScanqueueError
from scanqueue.observe.hooks import BridgeHooks

log = logging.getLogger(__name__)

MAX_BATCHES_PER_DRAIN = 1000  # bounds one drain; the next wake-up continues
MAINTENANCE_EVERY_S = 1.0
REDISPATCH_CHECK_EVERY_S = 5.0
MIN_WINDOW = 4  # the default window's floor (docs/reference.md#policies), also with no live worker
WINDOW_PER_SLOT = 2
# While the window is full, a scan's start frees room without notifying anyone: look
# again after WINDOW_RECHECK_MIN_S, doubling up to WINDOW_RECHECK_MAX_S while no room
# appears (saturated by long scans: 10 cheap looks a second), and back to the
# minimum whenever a look found room (short scans draining fast).
WINDOW_RECHECK_MIN_S = 0.01
WINDOW_RECHECK_MAX_S = 0.1
LOST_AFTER_S = 5.0  # re-send sooner when a message is evidently lost (overtaken, idle slots)
OVERTAKEN_MARGIN_S = 1.0  # dispatch-order slack before "a later scan runs" counts
# A worker refreshes its registration every WORKER_HEARTBEAT_EVERY_S; one silent for
# WORKER_STALE_AFTER_S no longer counts towards the window, and the leader deletes
# it after WORKER_FORGET_AFTER_S.
WORKER_HEARTBEAT_EVERY_S = 5.0
WORKER_STALE_AFTER_S = 20.0
WORKER_FORGET_AFTER_S = 3600.0


class PublishError(ScanqueueError):
    """Publishing stopped after ``published`` of the ids."""

    def __init__(self, published: int, cause: BaseException) -> None:
        self.published = published
        super().__init__(f"publish failed after {published} messages: {cause}")


Publish = Callable[[Sequence[str]], None]  # raises PublishError on partial failure


def refill_room(window: int) -> int:
    """Room a window with scans in flight must have before the bridge claims again.

    Half the window: the other half (one message a slot, at the default of twice
    the slots) keeps the workers fed while the claim runs, and claims come in
    batches of half a window instead of one claim a start.
    """
    return max(1, window // 2)


def default_window(live_slots: int) -> int:
    """Twice the live workers' slots, at least :data:`MIN_WINDOW`."""
    return max(MIN_WINDOW, WINDOW_PER_SLOT * live_slots)


class Bridge:
    """Claim → publish, one batch at a time, within the window."""

    def __init__(
        self,
        store: Store,
        publish: Publish,
        batch: int,
        window: Callable[[], int],
        *,
        key_limit: int = 0,
        derive: DeriveKey | None = None,
        on_intake: Callable[[Sequence[Intake]], None] | None = None,
        forget_starts: Callable[[], object] | None = None,
    ) -> None:
        self.store = store
        self.publish = publish
        self.forget_starts = forget_starts
        self.batch = batch
        self.window = window
        self.key_limit = key_limit  # SCANQUEUE_MAX_RUNNING_PER_KEY
        self.derive = derive
        self.on_intake = on_intake
        self.window_full = False  # the last claim left no room
        # Room the last claim left, plus the starts signalled since (a lower bound
        # for this bridge: other workers' starts free room it is not told of).
        self._known_room: int | None = None
        self._room_signalled = False
        self._notified = False
        self._again = False  # the last dispatch left claimable rows: claim again now

    def room_signalled(self, starts: int, notified: bool = False) -> bool:
        """Count ``starts`` (signalled by the worker's pool processes) into the room
        the last claim left.  False when the window is known to be still short of a
        refill, so a look would find nothing to claim; True when there is room,
        and then the next claim skips its unlocked look (one round trip on
        PostgreSQL).  ``notified`` (rows were inserted) while the last claim left
        room: the next claim takes the new rows in and claims, without a look
        first.  A poll looks as usual."""
        if notified and not self.window_full and self._known_room is not None:
            self._notified = True
            return True
        if starts <= 0 or not self.window_full or self._known_room is None:
            return True
        self._known_room += starts
        if self._known_room < refill_room(self.window()):
            return False
        self._room_signalled = True
        return True

    def dispatch_once(self) -> int:
        """Take in unseen rows, claim up to one batch (within the window and the
        policies) and publish it; returns how many were published.

        Told of inserted rows (PostgreSQL), the bridge claims first: the claim takes
        in the unseen rows it picks, and the intake of the rest follows the publish,
        off the pickup's path (one round trip less between a row's NOTIFY and its
        message)."""
        taken: list[Intake] = []
        released: list[str] = []
        window = self.window()
        look = not (self._room_signalled or self._notified)
        take_in = self._notified and self.derive is not None
        intake_after = take_in and self.store.claims_unseen()
        self._room_signalled = self._notified = False
        if self.forget_starts is not None:
            # Starts signalled before the claim are in its count: counting them again
            # afterwards would make the bridge claim one scan at a time.
            self.forget_starts()
        ids, room = self.store.claim_within_window(
            self.batch,
            window,
            key_limit=self.key_limit,
            derive=self.derive,
            intake=taken,
            released=released,
            min_room=refill_room(window),
            look=look,
            take_in=take_in and not intake_after,
        )
        self._known_room = room
        if released:
            # Queued again, for a later claim; the worker's start passes over a scan
            # whose dispatch was released, so their stale messages run nothing twice.
            log.debug("released %d dispatched scan(s) for higher-priority ones", len(released))
        # "Full" until a claim can take something: the loop then waits for starts.
        self.window_full = room < refill_room(window)
        try:
            sent = self._publish_claimed(ids)
        finally:
            # After the publish: the intake's events (queued for the event sender's
            # thread, which the first one wakes) are not on the pickup's path.  A run's
            # scan.started comes milliseconds later, so scan.queued still goes first.
            if taken and self.on_intake is not None:
                self.on_intake(taken)
        if intake_after:
            # Not after a failed publish: the next pass's look finds the rows unseen.
            self._take_in_rest()
        return sent

    def _take_in_rest(self) -> None:
        """After a claim-first publish: take in what the claim left.  Under a pause
        or limit the claim's deeper searches (past full keys at the head of the
        order) read keyed rows only; once taken in, the rows it passed over may be
        claimable, so the bridge claims again at once rather than at its next
        wake-up."""
        assert self.derive is not None
        rest = self.store.take_in_rest(self.derive)
        if rest and self.on_intake is not None:
            self.on_intake(rest)
        if rest and self.store.last_claim_policed() and not self.window_full:
            self._room_signalled = True  # room is known: the next claim skips its look
            self._again = True

    def _publish_claimed(self, ids: list[str]) -> int:
        if not ids:
            return 0
        try:
            self.publish(ids)
        except PublishError as exc:
            self.store.release_dispatch(ids[exc.published :])
            raise
        except Exception as exc:
            self.store.release_dispatch(ids)
            raise PublishError(0, exc) from exc
        return len(ids)

    def drain(self) -> int:
        """Dispatch batches until a claim comes back short or the window is full."""
        total = 0
        for _ in range(MAX_BATCHES_PER_DRAIN):
            self._again = False
            sent = self.dispatch_once()
            total += sent
            if (sent < self.batch or self.window_full) and not self._again:
                break
        return total

    def redispatch_once(self, older_than_s: float, live_slots: int | None = None) -> int:
        ids = self.store.claim_for_redispatch(
            older_than_s,
            self.batch,
            lost_after_s=min(LOST_AFTER_S, older_than_s),
            live_slots=live_slots,
            overtaken_margin_s=OVERTAKEN_MARGIN_S,
        )
        if ids:
            log.warning(
                "re-sending %d scan(s) dispatched and never started (their messages"
                " were lost or overtaken)",
                len(ids),
            )
        return self._publish_claimed(ids)


class BridgeService:
    """The bridge's two loops, run as threads (embedded in a worker or standalone)."""

    def __init__(
        self,
        store: Store,
        publish: Publish,
        leadership: Leadership,
        watcher: Watcher,
        *,
        batch: int,
        lease_s: float,
        max_attempts: int,
        reap_every_s: float,
        window: int | None = None,
        redispatch_after_s: float = DEFAULT_REDISPATCH_AFTER_S,
        hooks: BridgeHooks | None = None,
        key_limit: int = 0,
        derive: DeriveKey | None = None,
        on_intake: Callable[[Sequence[Intake]], None] | None = None,
    ) -> None:
        self.bridge = Bridge(
            store,
            publish,
            batch,
            self.window,
            key_limit=key_limit,
            derive=derive,
            on_intake=on_intake,
            forget_starts=watcher.forget_starts,
        )
        self.store = store
        self.leadership = leadership
        self.watcher = watcher
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.reap_every_s = reap_every_s
        self.fixed_window = window or None  # 0 or None: from the live workers
        self.redispatch_after_s = redispatch_after_s
        self.hooks = hooks or BridgeHooks()
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_reap = 0.0
        self._last_redispatch_check = 0.0
        self._live_slots: int | None = None  # refreshed by maintenance
        self._recheck_s = WINDOW_RECHECK_MIN_S
        # Leader-only maintenance plugged in by service.py (webhooks, retention):
        # (name, run_once, close); each bounded per tick, and one that fails never
        # skips the others.
        self.leader_tasks: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = []

    # -- the window ---------------------------------------------------------------

    def window(self) -> int:
        if self.fixed_window is not None:
            return self.fixed_window
        if self._live_slots is None:
            try:
                self.refresh_live_slots()
            except Exception as exc:
                # E.g. code newer than the schema: pickup goes on at the floor.
                log.warning("bridge: live workers unknown (%s); window %d", exc, MIN_WINDOW)
                self._live_slots = 0
        return default_window(self._live_slots or 0)

    def refresh_live_slots(self) -> int:
        self._live_slots = self.store.live_worker_slots(WORKER_STALE_AFTER_S)
        return self._live_slots

    # -- one step each ------------------------------------------------------------

    def dispatch_step(self) -> int:
        """Claim and publish what the window allows (any replica, leader or not)."""
        sent = self.bridge.drain()
        if sent:
            log.debug("dispatched %d scan(s)", sent)
            if self.hooks.dispatched:
                self.hooks.dispatched(sent)
        return sent

    def maintenance_step(self) -> None:
        leader = self.leadership.tick()
        if self.hooks.leader:
            self.hooks.leader(leader)
        try:
            self.refresh_live_slots()
        except Exception as exc:  # the last known slots stay in use
            log.warning("bridge: cannot read the live workers: %s", exc)
        now = time.monotonic()
        if leader and now - self._last_reap >= self.reap_every_s:
            self._last_reap = now
            self.reap_step()
        check_every = min(REDISPATCH_CHECK_EVERY_S, self.redispatch_after_s)
        if leader and now - self._last_redispatch_check >= check_every:
            self._last_redispatch_check = now
            self.redispatch_step()
        if self.hooks.queue_depth:
            # One count per interval, shared with the autoscaler and /metrics.
            self.hooks.queue_depth(self.store.queue_depth(max_age_s=MAINTENANCE_EVERY_S))
        if leader:
            fire_due_once(self.store, emit=self.hooks.schedule_event)
            for name, task, _close in self.leader_tasks:
                self._guarded(name, task)

    def reap_step(self) -> None:
        reaped = self.store.reap_orphans(self.lease_s, self.max_attempts)
        requeued = [r for r in reaped if r.requeued]
        failed = [r for r in reaped if not r.requeued]
        for r in requeued:
            log.warning(
                "scan %s attempt %d: worker lost (no heartbeat for %.0fs); re-queued",
                r.scan_id,
                r.attempt,
                self.lease_s,
            )
        for r in failed:
            log.warning(
                "scan %s attempt %d: worker lost (no heartbeat for %.0fs); failed after %d "
                "attempts",
                r.scan_id,
                r.attempt,
                self.lease_s,
                r.attempt,
            )
        if reaped and self.hooks.reaped:
            self.hooks.reaped(len(requeued), len(failed))
        if reaped and self.hooks.lost_runs:
            self.hooks.lost_runs(reaped)
        if requeued:
            self.dispatch_step()
        self.store.forget_workers(WORKER_FORGET_AFTER_S)

    def redispatch_step(self) -> int:
        return self.bridge.redispatch_once(self.redispatch_after_s, self._live_slots)

    # -- loops --------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while self.watcher.wait(
            self.stop_event, self._recheck_s if self.bridge.window_full else None
        ):
            if not self.bridge.room_signalled(self.watcher.starts, self.watcher.notified):
                continue  # known without a look: the window is still too full to refill
            sent = 0

            def step() -> None:
                nonlocal sent
                sent = self.dispatch_step()

            self._guarded("dispatch", step)
            if sent:
                self._recheck_s = WINDOW_RECHECK_MIN_S
            else:
                self._recheck_s = min(self._recheck_s * 2, WINDOW_RECHECK_MAX_S)

    def _maintenance_loop(self) -> None:
        while not self.stop_event.is_set():
            self._guarded("maintenance", self.maintenance_step)
            self.stop_event.wait(MAINTENANCE_EVERY_S)

    def _guarded(self, loop: str, step: Callable[[], object]) -> None:
        try:
            step()
        except ScanqueueError as exc:
            log.warning("bridge %s: %s", loop, exc)
        except Exception:
            log.exception("bridge %s step failed; carrying on", loop)

    def start(self) -> None:
        for name, target in (
            ("scanqueue-bridge-maintenance", self._maintenance_loop),
            ("scanqueue-bridge-dispatch", self._dispatch_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop both loops and hand leadership over at once."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.watcher.close()
        for _name, _task, close in self.leader_tasks:
            if close is not None:
                self._guarded("stop", close)
        self.leadership.release()
        if self.hooks.leader:
            self.hooks.leader(False)
