"""Leader election among bridges: a Redis lock, or a lease row without Redis.

Leadership governs only the maintenance work (reaping, re-sending; later
schedules and retention) — never pickup: every live bridge claims queued scans
(see :mod:`scanqueue.dispatch.bridge`), so a leader's death costs no pickup gap, only
up to one TTL of maintenance.  Two leaders at once still never run a scan
twice, because every state change is a compare-and-set in the store.

    follower ──tick: acquire ok──▶ leader ──tick: renew ok──▶ leader
        ▲                            │ renew refused (token no longer ours) ─┐
        │                            │ trust window over (renewals failing) ─┤
        └────────────────────────────┴──────────── step down ◀───────────────┘
                    (a follower keeps contesting on every tick)

The leader acts only inside a *trust window*: until ``TRUST_SHARE`` of the TTL
after its last successful renewal (measured from before the renewal was sent),
so it stops maintaining before the lock can expire and a standby take over.
Renew and release are token-checked (redis-py's Lua scripts; a CAS on the
holder for the lease row), so a process that lost the lock can never extend
or drop the new owner's.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from scanqueue.config import DEFAULT_LEADER_TTL_S, Settings
from scanqueue.db.store import Store
from scanqueue.errors import ScanqueueError
from scanqueue.identity import worker_identity

log = logging.getLogger(__name__)

TRUST_SHARE = 0.75
LOCK_NAME = "scanqueue:bridge-leader"
LEASE_NAME = "bridge"


class Leadership(Protocol):
    identity: str

    def tick(self) -> bool:
        """Acquire or renew; return whether this process may act as leader now."""
        ...

    def is_leader(self) -> bool: ...

    def release(self) -> None: ...


class _TrustWindow:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._valid_until = 0.0

    def renewed(self, sent_at: float) -> None:
        self._valid_until = sent_at + self.ttl_s * TRUST_SHARE

    def clear(self) -> None:
        self._valid_until = 0.0

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    @property
    def held(self) -> bool:
        return self._valid_until > 0.0


class RedisLeadership:
    """A redis-py Lock with our own token; renewed with the token-checked reacquire."""

    def __init__(
        self,
        client: redis.Redis,
        identity: str,
        ttl_s: float = DEFAULT_LEADER_TTL_S,
        name: str = LOCK_NAME,
    ) -> None:
        self.identity = identity
        self.ttl_s = ttl_s
        self._lock = client.lock(name, timeout=ttl_s, blocking=False, thread_local=False)
        self._window = _TrustWindow(ttl_s)

    def tick(self) -> bool:
        sent_at = time.monotonic()
        try:
            if self._window.held:
                self._lock.reacquire()
            elif self._lock.acquire(blocking=False, token=self.identity):
                log.info("bridge %s is now the leader", self.identity)
            else:
                return False
            self._window.renewed(sent_at)
        except LockNotOwnedError:
            self._step_down("the lock is no longer ours")
        except (LockError, RedisError, OSError) as exc:
            if self._window.held and not self._window.valid():
                self._step_down(f"cannot renew the lock: {exc}")
            else:
                log.warning("leader lock: %s", exc)
        return self.is_leader()

    def is_leader(self) -> bool:
        return self._window.held and self._window.valid()

    def _step_down(self, why: str) -> None:
        if self._window.held:
            log.warning("bridge %s steps down: %s", self.identity, why)
        self._window.clear()
        self._lock.local.token = None

    def release(self) -> None:
        if not self._window.held:
            return
        self._window.clear()
        try:
            self._lock.release()
            log.info("bridge %s released leadership", self.identity)
        except (LockError, RedisError, OSError) as exc:
            log.warning("could not release the leader lock (it will expire): %s", exc)


class LeaseLeadership:
    """The same rules on a lease row in the database (the embedded default)."""

    def __init__(
        self,
        store: Store,
        identity: str,
        ttl_s: float = DEFAULT_LEADER_TTL_S,
        name: str = LEASE_NAME,
    ) -> None:
        self.identity = identity
        self.ttl_s = ttl_s
        self.store = store
        self.name = name
        self._window = _TrustWindow(ttl_s)

    def tick(self) -> bool:
        sent_at = time.monotonic()
        try:
            if self.store.try_lease(self.name, self.identity, self.ttl_s):
                if not self._window.held:
                    log.info("bridge %s is now the leader", self.identity)
                self._window.renewed(sent_at)
            elif self._window.held:
                log.warning("bridge %s steps down: the lease is held by another", self.identity)
                self._window.clear()
        except ScanqueueError as exc:
            if self._window.held and not self._window.valid():
                log.warning("bridge %s steps down: cannot renew the lease: %s", self.identity, exc)
                self._window.clear()
            else:
                log.warning("leader lease: %s", exc)
        return self.is_leader()

    def is_leader(self) -> bool:
        return self._window.held and self._window.valid()

    def release(self) -> None:
        if not self._window.held:
            return
        self._window.clear()
        try:
            self.store.release_lease(self.name, self.identity)
            log.info("bridge %s released leadership", self.identity)
        except ScanqueueError as exc:
            log.warning("could not release the leader lease (it will expire): %s", exc)


def leadership_for(settings: Settings, store: Store) -> Leadership:
    """The Redis lock when Redis is configured, else the lease row in the database."""
    identity = worker_identity()
    if settings.redis_url:
        from scanqueue.db.redisconn import redis_client

        return RedisLeadership(
            redis_client(settings.redis_url),
            identity,
            ttl_s=settings.leader_ttl_s,
            name=f"scanqueue:{settings.queue}:leader",
        )
    return LeaseLeadership(
        store, identity, ttl_s=settings.leader_ttl_s, name=f"bridge:{settings.queue}"
    )
