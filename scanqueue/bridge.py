"""The bridge: queued rows in ``scans`` become broker messages carrying the scan id.

It is handed a ``publish`` callable and never imports Celery.  Two loops, each
a ``run_once`` plus a thin loop that only waits, stops and logs:

* dispatch — woken by the watcher (NOTIFY or poll); while leader, claims the
  oldest undispatched queued rows in batches and publishes them;
* maintenance — every second: renew or contest leadership; as leader, reap
  orphaned runs and re-send scans whose messages the broker lost; on every
  replica, refresh the queue-depth gauge.

    follower ──leadership won──▶ leader: drain at once, then on every wake-up
       ▲                            │
       └────── leadership lost ◀────┘   (dispatching stops on the next check)

A claim that could not be published is released at once, so the next pass
retries it; a message the broker drops after accepting it is re-sent by
:meth:`BridgeService.redispatch_once`.  Correctness never rests on the
bridge: duplicates are absorbed by the task's compare-and-set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import DEFAULT_REDISPATCH_AFTER_S
from .errors import ScanqueueError
from .leader import Leadership
from .store import ReapedScan, Store
from .watch import Watcher

log = logging.getLogger(__name__)

MAX_BATCHES_PER_DRAIN = 1000  # bounds one drain; the next wake-up continues
MAINTENANCE_EVERY_S = 1.0
REDISPATCH_CHECK_EVERY_S = 5.0


class PublishError(ScanqueueError):
    """Publishing stopped after ``published`` of the ids."""

    def __init__(self, published: int, cause: BaseException) -> None:
        self.published = published
        super().__init__(f"publish failed after {published} messages: {cause}")


Publish = Callable[[Sequence[str]], None]  # raises PublishError on partial failure
BrokerDepth = Callable[[], int | None]  # None when the broker cannot tell


class Bridge:
    """Claim → publish, one batch at a time."""

    def __init__(self, store: Store, publish: Publish, batch: int) -> None:
        self.store = store
        self.publish = publish
        self.batch = batch

    def dispatch_once(self) -> int:
        """Claim up to one batch and publish it; returns how many were published."""
        ids = self.store.claim_for_dispatch(self.batch)
        return self._publish_claimed(ids)

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
        """Dispatch batches until a claim comes back short (bounded)."""
        total = 0
        for _ in range(MAX_BATCHES_PER_DRAIN):
            sent = self.dispatch_once()
            total += sent
            if sent < self.batch:
                break
        return total

    def redispatch_once(self, older_than_s: float) -> int:
        ids = self.store.claim_for_redispatch(older_than_s, self.batch)
        if ids:
            log.warning(
                "re-sending %d scan(s) dispatched over %.0fs ago and never started "
                "(the broker lost their messages)",
                len(ids),
                older_than_s,
            )
        return self._publish_claimed(ids)


@dataclass
class BridgeHooks:
    """Where the bridge reports what it sees (metrics); all optional."""

    queue_depth: Callable[[int], None] | None = None
    leader: Callable[[bool], None] | None = None
    dispatched: Callable[[int], None] | None = None
    reaped: Callable[[int, int], None] | None = None  # requeued, failed
    lost_runs: Callable[[Sequence[ReapedScan]], None] | None = None  # each reaped run


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
        broker_depth: BrokerDepth | None = None,
        redispatch_after_s: float = DEFAULT_REDISPATCH_AFTER_S,
        hooks: BridgeHooks | None = None,
    ) -> None:
        self.bridge = Bridge(store, publish, batch)
        self.store = store
        self.leadership = leadership
        self.watcher = watcher
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.reap_every_s = reap_every_s
        self.broker_depth = broker_depth
        self.redispatch_after_s = redispatch_after_s
        self.hooks = hooks or BridgeHooks()
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._was_leader = False
        self._last_reap = 0.0
        self._last_redispatch_check = 0.0

    # -- one step each ------------------------------------------------------------

    def dispatch_step(self) -> int:
        if not self.leadership.is_leader():
            return 0
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
        if leader and not self._was_leader:
            self._was_leader = True
            self.dispatch_step()  # a new leader catches up at once
        self._was_leader = leader
        now = time.monotonic()
        if leader and now - self._last_reap >= self.reap_every_s:
            self._last_reap = now
            self.reap_step()
        check_every = min(REDISPATCH_CHECK_EVERY_S, self.redispatch_after_s)
        if leader and now - self._last_redispatch_check >= check_every:
            self._last_redispatch_check = now
            self.redispatch_step()
        if self.hooks.queue_depth:
            self.hooks.queue_depth(self.store.queue_depth())

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

    def redispatch_step(self) -> int:
        depth = None
        if self.broker_depth is not None:
            try:
                depth = self.broker_depth()
            except Exception as exc:
                log.debug("broker queue depth unavailable: %s", exc)
        if depth:
            return 0  # messages are still waiting on the broker: nothing is lost yet
        return self.bridge.redispatch_once(self.redispatch_after_s)

    # -- loops --------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while self.watcher.wait(self.stop_event):
            self._guarded("dispatch", self.dispatch_step)

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
        self.leadership.release()
        if self.hooks.leader:
            self.hooks.leader(False)
