"""The embedded SQLite broker's consumer: a freed prefetch slot is refilled at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Queue

from scanqueue.broker_sqlite import register


def test_an_ack_ends_the_wait_for_the_next_poll(tmp_path: Path) -> None:
    # A worker holding its prefetch cannot take the next message until a scan is
    # acked; with kombu's plain sleep it then waited out the rest of the poll
    # interval, which at concurrency 2 held the embedded broker to 26 scans/s.
    register()
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
    got: list[tuple[int, Any]] = []
    with Connection(url, transport_options={"polling_interval": 5}) as conn:
        producer = conn.Producer()
        for n in (1, 2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="q", declare=[queue])
        with conn.Consumer(
            queue, callbacks=[lambda body, message: got.append((body["n"], message))]
        ) as consumer:
            consumer.qos(prefetch_count=1)
            conn.drain_events(timeout=10)
            assert [n for n, _ in got] == [1]
            acker = threading.Timer(0.3, got[0][1].ack)
            acker.start()
            t0 = time.monotonic()
            conn.drain_events(timeout=10)
            waited = time.monotonic() - t0
            acker.join()
    assert [n for n, _ in got] == [1, 2]
    assert waited < 2, f"waited {waited:.1f}s: the 5 s poll, not the ack, released it"


def test_a_publish_from_this_process_ends_the_wait(tmp_path: Path) -> None:
    register()
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
    got: list[int] = []
    with (
        Connection(url, transport_options={"polling_interval": 5}) as conn,
        Connection(url) as publisher,
    ):
        queue(conn.default_channel).declare()
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(body["n"])]):
            sender = threading.Timer(
                0.3,
                lambda: publisher.Producer().publish(
                    {"n": 1}, exchange=queue.exchange, routing_key="q", declare=[queue]
                ),
            )
            sender.start()
            t0 = time.monotonic()
            conn.drain_events(timeout=10)
            waited = time.monotonic() - t0
            sender.join()
    assert got == [1]
    assert waited < 2, f"waited {waited:.1f}s for the 5 s poll"
