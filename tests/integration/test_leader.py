"""Leader election on a real Redis lock and on the database lease row."""

from __future__ import annotations

import time

import pytest

from scanqueue.db.redisconn import redis_client
from scanqueue.db.store import Store
from scanqueue.dispatch.leader import LeaseLeadership, RedisLeadership
from tests.conftest import RedisServer
from tests.support import wait_for


def test_redis_lock_has_one_leader_and_hands_over_on_release(redis_url: str) -> None:
    a = RedisLeadership(redis_client(redis_url), "a", ttl_s=5, name="t:lock")
    b = RedisLeadership(redis_client(redis_url), "b", ttl_s=5, name="t:lock")
    assert a.tick() is True and b.tick() is False
    assert a.tick() is True and a.is_leader() and not b.is_leader()
    assert redis_client(redis_url).get("t:lock") == b"a"  # our own token, for debugging
    a.release()
    assert not a.is_leader() and b.tick() is True


def test_redis_renewal_checks_the_token(redis_url: str) -> None:
    client = redis_client(redis_url)
    a = RedisLeadership(client, "a", ttl_s=5, name="t:lock")
    assert a.tick()
    client.set("t:lock", "intruder", px=5000)  # someone else owns it now
    assert a.tick() is False and not a.is_leader()
    assert client.get("t:lock") == b"intruder"  # not extended, not deleted
    a.release()
    assert client.get("t:lock") == b"intruder"


def test_redis_standby_takes_over_within_one_ttl_after_the_leader_vanishes(redis_url: str) -> None:
    a = RedisLeadership(redis_client(redis_url), "a", ttl_s=1.5, name="t:lock")
    b = RedisLeadership(redis_client(redis_url), "b", ttl_s=1.5, name="t:lock")
    # A tick whose round trip outlasts the trust window (1.125 s: a stalled machine)
    # rightly reports no leadership; the next one renews.  Leading is the premise here.
    wait_for(a.tick, 5, interval=0.1, what="a leads")
    t0 = time.monotonic()  # a dies: no more ticks
    while not b.tick():
        assert time.monotonic() - t0 < 3, "standby did not take over"
        time.sleep(0.1)
    assert 1.0 < time.monotonic() - t0 < 2.5
    assert not a.is_leader()  # the trust window closed before the TTL ran out


def test_redis_leader_steps_down_when_redis_is_gone_and_recontests_after(tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        a = RedisLeadership(redis_client(server.url), "a", ttl_s=2, name="t:lock")
        assert a.tick()
        server.stop()
        t0 = time.monotonic()
        while a.tick():
            assert time.monotonic() - t0 < 3
            time.sleep(0.1)
        assert time.monotonic() - t0 <= 2 * 0.75 + 0.5  # stops inside the trust window
        server.start()  # same port
        t1 = time.monotonic()
        while not a.tick():  # lost once is not lost for ever
            assert time.monotonic() - t1 < 10
            time.sleep(0.2)
    finally:
        server.stop()


def test_lease_row_election(store: Store) -> None:
    a = LeaseLeadership(store, "a", ttl_s=1.5, name="t")
    b = LeaseLeadership(store, "b", ttl_s=1.5, name="t")
    assert a.tick() is True and b.tick() is False
    a.release()
    assert b.tick() is True
    t0 = time.monotonic()  # b dies
    while not a.tick():
        assert time.monotonic() - t0 < 4
        time.sleep(0.1)
    assert a.is_leader() and time.monotonic() - t0 > 1.0


@pytest.mark.parametrize("ttl", [2.0])
def test_lease_leader_stops_before_its_lease_can_expire(store: Store, ttl: float) -> None:
    a = LeaseLeadership(store, "a", ttl_s=ttl, name="t2")
    assert a.tick()
    time.sleep(ttl * 0.8)  # no renewals: the trust window (75 % of the TTL) has closed
    assert not a.is_leader()
