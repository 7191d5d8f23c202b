"""The bridge's publisher: a claimed batch goes out whole, in order, carrying only ids."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from scanqueue.config import TASK_NAME, Settings
from scanqueue.dispatch.bridge import PublishError
from scanqueue.dispatch.publish import make_publisher
from scanqueue.dispatch.redis_push import RedisPush
from scanqueue.worker.app import QUEUE, celery_defaults
from tests.support import RedisServer


def _app(broker_url: str, tmp_path: Path) -> Celery:
    settings = Settings.from_env(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'scans.db'}", "CELERY_BROKER_URL": broker_url}
    )
    app = Celery("publish-test")
    app.conf.update(celery_defaults(settings))
    app.conf.broker_connection_max_retries = 1
    app.conf.broker_connection_timeout = 2
    return app


def _ids(messages: list[dict[str, Any]]) -> list[str]:
    ids = []
    for message in messages:
        assert message["headers"]["task"] == TASK_NAME
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {}
        ids.append(args[0])
    return ids


def _queued_ids(client: redis.Redis) -> list[str]:
    """The scan ids on the queue, in the order workers take them (LPUSH puts the newest
    first; consumers pop from the other end)."""
    return _ids([json.loads(m) for m in reversed(client.lrange(QUEUE, 0, -1))])


def test_redis_gets_the_whole_batch_in_order(redis_url: str, tmp_path: Path) -> None:
    app = _app(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    publish = make_publisher(app)
    # The first batch goes through kombu (declaring the queue), in one pipeline.
    first = [f"first-{i:03d}" for i in range(50)]
    before = _command_calls(client)
    publish(first)
    assert _command_calls(client).get("lpush", 0) - before.get("lpush", 0) == len(first)
    # Later ones take the short way: the whole batch in one LPUSH.
    assert publish.pushes_directly
    ids = [f"scan-{i:03d}" for i in range(150)]
    before = _command_calls(client)
    publish(ids)
    assert _command_calls(client).get("lpush", 0) - before.get("lpush", 0) == 1
    assert _queued_ids(client) == first + ids
    client.delete(QUEUE)
    app.close()


def _on_the_short_way(redis_url: str, tmp_path: Path) -> tuple[Celery, redis.Redis, Any]:
    """An app, a client of its broker and a publisher past its first batch ("a", sent
    through kombu), so that the next ones take the short way."""
    app = _app(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    publish = make_publisher(app)
    publish(["a"])
    assert publish.pushes_directly
    return app, client, publish


def test_a_message_sent_early_is_queued_before_its_answer_is_read(
    redis_url: str, tmp_path: Path
) -> None:
    """``send_early`` writes the LPUSH and leaves Redis's answer for later (a successor's
    message: the round trip overlaps the run); the message is on the queue at once, and
    once the answer is read the connection serves the next batch."""
    import time

    app, client, publish = _on_the_short_way(redis_url, tmp_path)
    settle = publish.send_early(["early"])
    deadline = time.monotonic() + 5
    while client.llen(QUEUE) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert client.llen(QUEUE) == 2  # there before the answer was read
    settle()
    settle()  # read once; a second call does nothing
    publish(["after"])
    assert publish.pushes_directly
    assert _queued_ids(client) == [
        "a",
        "early",
        "after",
    ]
    client.delete(QUEUE)
    app.close()


def test_an_early_message_whose_answer_is_an_error_is_not_counted_as_sent(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer read late says the LPUSH failed (here: the queue's key holds a
    string): kombu's publish is tried, as for a batch sent at once, and when it fails
    too the read raises PublishError with nothing sent."""
    app, client, publish = _on_the_short_way(redis_url, tmp_path)
    client.delete(QUEUE)
    client.set(QUEUE, "not a list")
    try:
        settle = publish.send_early(["x"])
        with (
            caplog.at_level("WARNING", logger="scanqueue.dispatch.publish"),
            pytest.raises(PublishError) as caught,
        ):
            settle()
        assert caught.value.published == 0
        assert "WRONGTYPE" in caplog.text
        client.delete(QUEUE)
        publish(["b"])  # through kombu, then the short way again
        publish(["c"])
        assert publish.pushes_directly
        assert _queued_ids(client) == ["b", "c"]
    finally:
        client.delete(QUEUE)
        app.close()


def test_a_lost_redis_connection_falls_back_to_kombu_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The short way's connection dies with the server: that batch goes to kombu's
    publish, which fails too, so none of it counts as sent (the bridge releases every
    id for the next claim: a duplicate is harmless, a loss is not). Once the server is
    back kombu publishes, and the next batches take the short way again."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        app = _app(server.url, tmp_path)
        publish = make_publisher(app)
        watcher = redis.Redis.from_url(server.url)
        publish(["a"])
        held_by_kombu = len(watcher.client_list())
        publish(["b"])
        assert publish.pushes_directly
        # The short way uses kombu's own connection: no more clients than before.
        assert len(watcher.client_list()) == held_by_kombu
        watcher.close()
        server.stop()
        with (
            caplog.at_level("WARNING", logger="scanqueue.dispatch.publish"),
            pytest.raises(PublishError) as caught,
        ):
            publish(["lost-1", "lost-2"])
        assert caught.value.published == 0
        assert "publishing through kombu: the broker connection failed" in caplog.text
        assert not publish.pushes_directly
        server.start()  # same port, empty
        publish(["c", "d"])  # through kombu, which reconnects
        assert publish.pushes_directly
        publish(["e"])
        publish(["f"])
        client = redis.Redis.from_url(server.url)
        assert _queued_ids(client) == [
            "c",
            "d",
            "e",
            "f",
        ]
        # Still kombu's one connection, kept by the short way (the client list counts
        # this client, as it counted the watcher before).
        assert len(client.client_list()) == held_by_kombu
        app.close()
    finally:
        server.stop()


def test_a_forked_process_pushes_on_a_connection_of_its_own(redis_url: str, tmp_path: Path) -> None:
    """The short way keeps its connection between batches; a child forked from the
    process takes its own, so neither reads the other's replies."""
    app = _app(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    publish = make_publisher(app)
    publish(["parent-1"])
    publish(["parent-2"])  # the short way, which keeps its connection
    assert publish.pushes_directly
    clients = len(client.client_list())
    pushed_r, pushed_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            publish(["child-1"])
            publish(["child-2"])
            code = 0 if publish.pushes_directly else 2
            os.write(pushed_w, b"x")
            os.read(done_r, 1)  # alive, connection open, while the parent counts
        finally:
            os._exit(code)
    try:
        assert os.read(pushed_r, 1) == b"x"
        assert len(client.client_list()) == clients + 1  # the child's own connection
    finally:
        os.write(done_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (pushed_r, pushed_w, done_r, done_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    publish(["parent-3"])
    assert publish.pushes_directly
    assert _queued_ids(client) == [
        "parent-1",
        "parent-2",
        "child-1",
        "child-2",
        "parent-3",
    ]
    client.delete(QUEUE)
    app.close()


def test_a_short_way_that_breaks_otherwise_hands_over_to_kombu_for_good(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a lost connection (here an envelope that cannot be written): that batch and
    the later ones go through kombu, so nothing is held back by a broken short way."""
    app, client, publish = _on_the_short_way(redis_url, tmp_path)

    def broken(*_: Any, **__: Any) -> str:
        raise TypeError("cannot write this envelope")

    monkeypatch.setattr(RedisPush, "envelope", broken)
    publish(["b", "c"])
    publish(["d"])
    assert not publish.pushes_directly
    assert _queued_ids(client) == [
        "a",
        "b",
        "c",
        "d",
    ]
    client.delete(QUEUE)
    app.close()


@pytest.mark.parametrize(
    "options",
    [{"global_keyprefix": "pfx-test:"}, {"body_encoding": "utf-8"}],
    ids=["global_keyprefix", "body_encoding"],
)
def test_where_kombus_write_differs_its_publish_stays(
    redis_url: str, tmp_path: Path, options: dict[str, str]
) -> None:
    """A key prefix, or a body stored without an encoding (kombu then writes the
    bytes in its own JSON form): the short way is not taken."""
    app = _app(redis_url, tmp_path)
    app.conf.broker_transport_options = options
    client = redis.Redis.from_url(redis_url)
    publish = make_publisher(app)
    publish(["x"])
    publish(["y"])
    assert not publish.pushes_directly
    key = options.get("global_keyprefix", "") + QUEUE
    raw = [json.loads(m) for m in reversed(client.lrange(key, 0, -1))]
    assert [m["properties"]["body_encoding"] for m in raw] == [
        options.get("body_encoding", "base64")
    ] * 2
    client.delete(key)
    app.close()


def _command_calls(client: redis.Redis) -> dict[str, int]:
    stats: Any = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def test_sqlite_broker_stores_the_batch_in_one_commit(tmp_path: Path) -> None:
    broker_file = tmp_path / "broker.db"
    app = _app(f"sqla+sqlite:///{broker_file}", tmp_path)
    ids = [f"scan-{i:03d}" for i in range(40)]
    make_publisher(app)(ids)
    with sqlite3.connect(broker_file) as db:
        rows = db.execute("SELECT payload FROM kombu_message ORDER BY id").fetchall()
    assert _ids([json.loads(p) for (p,) in rows]) == ids
    app.close()


def _without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """A message with its per-message ids (task id, delivery tag) blanked."""
    message = json.loads(json.dumps(message))
    for key in ("id", "root_id"):
        message["headers"][key] = "-"
    for key in ("correlation_id", "delivery_tag"):
        message["properties"][key] = "-"
    return message


def test_the_message_is_the_one_send_task_writes(redis_url: str, tmp_path: Path) -> None:
    """Built without send_task (a third of the CPU), byte for byte the same message but
    for its ids: Celery's task protocol 2, as workers, Flower and tools read it."""
    app = _app(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    publisher = make_publisher(app)
    assert publisher.plain()
    compared: list[bool] = []
    # Another program's row may have any id: quotes, backslashes, non-ASCII, long ones
    # (Celery's argsrepr is not repr() for those, and truncates); plain ones take a
    # shortcut past saferepr, up to 200 characters.
    scan_ids = (
        "scan-1",
        "it's",
        'back\\slash "q"',
        "sc\u00e9n\u2028x",
        "k" * 3000,
        "0190abcd-1234-7000-8000-00000000000f",
        "a/b=c+d@e:f.g_h-i",
        "p" * 200,
        "p" * 201,
        "tab\there",
    )
    for scan_id in scan_ids:
        client.delete(QUEUE)
        app.send_task(TASK_NAME, args=(scan_id,), queue=QUEUE)
        direct = publisher.pushes_directly  # the first goes through kombu, the rest not
        publisher([scan_id])
        assert publisher.pushes_directly
        by_celery, ours = [json.loads(m) for m in reversed(client.lrange(QUEUE, 0, -1))]
        assert ours["headers"]["id"] != by_celery["headers"]["id"]
        assert ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
        assert ours["headers"]["root_id"] == ours["headers"]["id"]
        assert _without_ids(ours) == _without_ids(by_celery), scan_id
        assert _ids([ours]) == [scan_id]
        compared.append(direct)
    assert compared == [False] + [True] * (len(scan_ids) - 1)
    client.delete(QUEUE)
    app.close()


def test_a_publish_signal_receiver_gets_celerys_own_message(redis_url: str, tmp_path: Path) -> None:
    """A before_task_publish receiver (a tracing instrumentation adding headers) sees
    every message: the batch then goes through send_task."""
    from celery import signals

    app = _app(redis_url, tmp_path)
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    seen: list[str] = []

    def add_header(headers: dict[str, Any], **_: Any) -> None:
        headers["traceparent"] = "00-abc-def-01"
        seen.append(headers["argsrepr"])

    signals.before_task_publish.connect(add_header)
    try:
        publisher = make_publisher(app)
        assert not publisher.plain()
        publisher(["scan-1", "scan-2"])
    finally:
        signals.before_task_publish.disconnect(add_header)
    assert seen == ["('scan-1',)", "('scan-2',)"]
    raw = [json.loads(m) for m in reversed(client.lrange(QUEUE, 0, -1))]
    assert [m["headers"]["traceparent"] for m in raw] == ["00-abc-def-01"] * 2
    assert _ids(raw) == ["scan-1", "scan-2"]
    assert make_publisher(app).plain()
    client.delete(QUEUE)
    app.close()


def test_rabbitmq_gets_single_messages_on_a_queue_declared_once_per_channel(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    """A successor's message goes alone; the queue is declared before the first
    message on a channel (RabbitMQ drops a message for a queue that does not exist),
    and again on a new channel after the connection was lost."""
    from kombu import Connection

    queue = f"scanqueue-publish-{tmp_path.name[-12:]}"
    app = _app(rabbitmq_url, tmp_path)
    app.conf.task_default_queue = queue
    publish = make_publisher(app, queue)
    try:
        publish(["one"])
        publish(["two"])
        # The next publish runs on a new channel (as after a broker blip).
        with app.producer_or_acquire() as producer:
            old_channel = producer.channel
            producer.connection.collect()
        with Connection(rabbitmq_url) as conn:
            conn.default_channel.queue_delete(queue)
        publish(["three"])
        with Connection(rabbitmq_url) as conn:
            got = []
            for _ in range(5):
                message = conn.default_channel.basic_get(queue, no_ack=True)
                if message is None:
                    break
                args, _, _ = json.loads(message.body)
                got.append(args[0])
            assert got == ["three"]  # declared again on the new channel, so not dropped
            with app.producer_or_acquire() as producer:
                assert producer.channel is not old_channel
            conn.default_channel.queue_delete(queue)
    finally:
        app.close()
