"""The embedded SQLite broker: a freed prefetch slot is refilled at once; taken messages go."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kombu import Connection, Exchange, Queue

from scanqueue.worker.broker_sqlite import register


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


_PUBLISH_FROM_ANOTHER_PROCESS = """
import sys
from kombu import Connection, Exchange, Queue
from scanqueue.worker.broker_sqlite import register
register()
queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
with Connection(sys.argv[1]) as conn:
    conn.Producer().publish({"n": 7}, exchange=queue.exchange, routing_key="q", declare=[queue])
"""


def test_a_publish_from_another_process_ends_the_wait(tmp_path: Path) -> None:
    # A standalone bridge publishes in its own process, a dispatch window's few
    # messages at a time: waiting out the poll after each refill held a worker at
    # concurrency 2 to 35 scans/s.
    register()
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
    got: list[int] = []
    with Connection(url, transport_options={"polling_interval": 30}) as conn:
        queue(conn.default_channel).declare()
        with conn.Consumer(queue, callbacks=[lambda body, message: got.append(body["n"])]):
            publisher = subprocess.Popen([sys.executable, "-c", _PUBLISH_FROM_ANOTHER_PROCESS, url])
            try:
                t0 = time.monotonic()
                conn.drain_events(timeout=60)
                waited = time.monotonic() - t0
            finally:
                assert publisher.wait(timeout=30) == 0
    assert got == [7]
    assert waited < 20, f"waited {waited:.1f}s: the 30 s poll, not the commit, released it"


def _messages(path: Path) -> list[tuple[int, bool]]:
    with sqlite3.connect(path) as db:
        return [(i, bool(v)) for i, v in db.execute("SELECT id, visible FROM kombu_message")]


def _publish(conn: Connection, queue: Queue, numbers: range) -> None:
    producer = conn.Producer()
    for n in numbers:
        producer.publish({"n": n}, exchange=queue.exchange, routing_key="q", declare=[queue])


def test_a_taken_message_is_deleted_and_one_never_acked_comes_back(tmp_path: Path) -> None:
    # The stock transport kept every taken message (visible = 0) forever: the file
    # grew with every scan and each empty poll scanned them all.
    register()
    path = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{path}"
    queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
    with Connection(url, transport_options={"polling_interval": 0.05}) as conn:
        _publish(conn, queue, range(3))
        assert len(_messages(path)) == 3
        got: list[int] = []
        with conn.Consumer(queue, callbacks=[lambda body, m: (got.append(body["n"]), m.ack())]):
            for _ in range(3):
                conn.drain_events(timeout=10)
        assert got == [0, 1, 2]
        assert _messages(path) == []

    # Taken but not acked when the connection closes: kombu hands it back as a new
    # message, so deleting it when it was taken loses nothing.
    with Connection(url, transport_options={"polling_interval": 0.05}) as conn:
        _publish(conn, queue, range(1))
        with conn.Consumer(queue, callbacks=[lambda body, m: None]):
            conn.drain_events(timeout=10)
        assert _messages(path) == []
    with Connection(url, transport_options={"polling_interval": 0.05}) as conn:
        again: list[int] = []
        with conn.Consumer(queue, callbacks=[lambda body, m: (again.append(body["n"]), m.ack())]):
            conn.drain_events(timeout=10)
        assert again == [0]


def test_messages_an_earlier_version_left_taken_are_deleted_at_the_first_poll(
    tmp_path: Path,
) -> None:
    register()
    path = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{path}"
    queue = Queue("q", Exchange("q", type="direct"), routing_key="q")
    with Connection(url) as conn:
        _publish(conn, queue, range(4))
    with sqlite3.connect(path) as db:  # three taken as the stock transport leaves them
        db.execute("UPDATE kombu_message SET visible = 0 WHERE id IN (1, 2, 3)")
    got: list[int] = []
    with Connection(url, transport_options={"polling_interval": 0.05}) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, m: (got.append(body["n"]), m.ack())]):
            conn.drain_events(timeout=10)
        assert got == [3]
        assert _messages(path) == []


_DECLARE_AT_ONCE = """
import sys, time
from kombu import Connection, Exchange, Queue
from scanqueue.worker.broker_sqlite import register
register()
url, start_at, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
with Connection(url) as conn:
    channel = conn.default_channel
    for i in range(count):
        # Every process declares queue i in the same few milliseconds.
        time.sleep(max(0.0, start_at + i * 0.05 - time.time()))
        Queue(f"q{i}", Exchange(f"q{i}", type="direct"), routing_key=f"q{i}")(channel).declare()
"""


def test_processes_that_declare_a_new_queue_at_once_all_go_on(tmp_path: Path) -> None:
    # A worker and a standalone bridge started together both found no queue row and
    # inserted one; the loser died on the UNIQUE constraint (kombu rolls back only
    # on OperationalError).
    register()
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    with Connection(url) as conn:  # the tables, made once
        Queue("setup", Exchange("setup", type="direct"), routing_key="setup")(
            conn.default_channel
        ).declare()
    start_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DECLARE_AT_ONCE, url, str(start_at), "20"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            errors.append(err.strip().splitlines()[-1])
    assert errors == []
    rows = (
        sqlite3.connect(tmp_path / "broker.db").execute("SELECT name FROM kombu_queue").fetchall()
    )
    assert sorted(r[0] for r in rows) == sorted(["setup", *(f"q{i}" for i in range(20))])
