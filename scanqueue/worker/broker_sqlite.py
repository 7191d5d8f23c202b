"""kombu's SQLAlchemy transport, made usable as the embedded SQLite broker.

Registered for the ``sqla+`` / ``sqlalchemy+`` URL prefixes by :func:`register`.
Four fixes over the stock transport:

* it passes every transport option to ``create_engine``: ``polling_interval``
  is accepted here (the stock one raises ``TypeError`` and polls every second,
  doubling pickup latency), and SQLite files get WAL and a busy timeout so the
  worker and bridge processes can share them;
* it marks a taken message invisible and never deletes it, so the file grew by
  about 1.4 KB a scan and every empty poll scanned all of them under SQLite's
  write lock (97 ms per poll, ten polls a second, after 200,000 scans): here a
  message is deleted when it is taken;
* it commits once per published message: kombu's ``Producer.batch()``
  publishes a batch in one commit here;
* two processes that declare a new queue at once (a worker and a standalone
  bridge started together) both insert its row, and the stock transport let the
  loser die on the UNIQUE violation: here it reads the winner's row.

And one addition: the consumer's wait between polls ends early when a poll may
find something — when this process frees a prefetch slot (an ack or reject) or
publishes, and when another process commits to the broker's file (a standalone
``scanqueue bridge`` publishing, another worker taking).  Otherwise, once a
worker holds its prefetch, every scan waited up to a whole poll interval for the
next message after the last one finished (26 scans/s at concurrency 2 with the
0.1 s default; 63/s with a 0.02 s poll); and with the bridge in its own process,
which publishes a dispatch window's few messages at a time, every refill waited
for the poll (35 scans/s at concurrency 2).  Another process's commit is seen
by :class:`~scanqueue.db.sqlite_commits.CommitWatch`.
"""

from __future__ import annotations

import threading
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError

from scanqueue.db.sqlite_commits import CommitWatch

_NOT_ENGINE_OPTIONS = (
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
)


# Set by anything in this process that may make a poll worthwhile at once.
_activity = threading.Event()


class Channel(kombu_sqlalchemy.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._swept: set[int] = set()  # queues whose leftover taken messages are deleted
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {
            k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS
        }
        if conninfo.hostname.startswith("sqlite"):
            options.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(conninfo.hostname, **options)
        if conninfo.hostname.startswith("sqlite"):

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        return engine

    def _get_or_create(self, queue: str) -> Any:
        """The queue's row, made if missing; another process may make it at the same
        moment: the stock transport then raised the UNIQUE violation (it rolls back
        only on OperationalError) and the worker died on it."""
        try:
            return super()._get_or_create(queue)  # type: ignore[no-untyped-call]
        except IntegrityError:
            self.session.rollback()
            found = self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).first()
            if found is None:
                raise
            return found

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """Take the oldest visible message of ``queue`` and delete it, in one transaction.

        The stock transport keeps taken messages with ``visible = False`` forever;
        nothing reads them again (kombu hands an unacked message back to the
        broker as a new one), so they are deleted instead, and those an earlier
        version left behind are deleted at this channel's first poll of the queue.
        """
        obj = self._get_or_create(queue)
        message = self.message_cls
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            if obj.id not in self._swept:
                self.session.query(message).filter(message.queue_id == obj.id).filter(
                    message.visible == False  # noqa: E712 - SQL, not Python
                ).delete(synchronize_session=False)
                self._swept.add(obj.id)
            msg = (
                self.session.query(message)
                .with_for_update()
                .filter(message.queue_id == obj.id)
                .filter(message.visible != False)  # noqa: E712
                .order_by(message.sent_at)
                .order_by(message.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise Empty()
            payload = msg.payload
            self.session.delete(msg)
            return loads(bytes_to_str(payload))  # type: ignore[no-untyped-call]
        finally:
            self.session.commit()

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        return PublishBatch(self, max_size)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        _activity.set()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        _activity.set()

    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        batch = kwargs.pop("_publish_batch", None)
        if batch is None:
            super()._put(queue, message, **kwargs)  # type: ignore[no-untyped-call]
            _activity.set()
            return
        batch.rows.append((queue, dumps(message)))  # type: ignore[no-untyped-call]


class PublishBatch:
    """kombu's publish-batch protocol over the channel's session: one commit a batch.

    Messages are only collected until the flush, which then writes them all in
    one short transaction.  Adding each to the session as it came would take
    SQLite's write lock at the second message (the queue lookup autoflushes) and
    hold it while the rest were built, and a consumer waiting in its busy handler
    would then rarely get in while the bridge published a backlog.
    """

    def __init__(self, channel: Channel, max_size: int) -> None:
        self.channel = channel
        self.max_size = max(1, max_size)
        self.rows: list[tuple[Any, str]] = []  # (queue name, message body)

    def publish(self, message: Any, **kwargs: Any) -> Any:
        result = self.channel.basic_publish(message, _publish_batch=self, **kwargs)  # type: ignore[no-untyped-call]
        if len(self.rows) >= self.max_size:
            self.flush()
        return result

    def flush(self) -> None:
        if not self.rows:
            return
        channel = self.channel
        try:
            # Queue rows first, while nothing is pending: reads do not take the lock.
            queues = {name: channel._get_or_create(name) for name, _ in self.rows}
            channel.session.add_all(
                [channel.message_cls(body, queues[name]) for name, body in self.rows]
            )
            channel.session.commit()
        except OperationalError:
            self.discard()
            raise
        self.rows.clear()
        _activity.set()

    def discard(self) -> None:
        self.channel.session.rollback()
        self.rows.clear()

    def close(self) -> None:
        if self.rows:
            self.discard()


class Transport(kombu_sqlalchemy.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        self._commits = CommitWatch.of_url(client.hostname or "")

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        """kombu's loop, with the wait between polls cut short by ``_activity`` in this
        process and by another process's commit to the broker's file."""
        started = monotonic()
        polling_interval = self.polling_interval
        if timeout and polling_interval and polling_interval > timeout:
            polling_interval = timeout
        commits = self._commits
        while True:
            _activity.clear()  # before the poll: activity during it means poll again
            commits.mark()  # likewise for another process's commit
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
            except Empty:
                if timeout is not None and monotonic() - started >= timeout:
                    raise TimeoutError() from None
                if polling_interval is not None:
                    commits.wait(_activity, polling_interval)
            else:
                return


def register() -> None:
    for alias in ("sqla", "sqlalchemy"):
        TRANSPORT_ALIASES[alias] = "scanqueue.worker.broker_sqlite:Transport"
