"""The Redis broker's own write of a batch: kombu's message envelope, one ``LPUSH``.

Owns the short way to the Redis broker.  kombu's publish of one message on Redis
is a single ``LPUSH`` of a JSON envelope, but getting there costs about 550
Python calls (the producer, the virtual channel, a new redis-py client object per
message); in a process that was idle (a pickup) that was about 1 ms of a message's
wall time, and 0.15 ms of CPU back to back.  Here the envelope is written as
kombu's Redis channel writes it, with the settings read off that channel once, and
the whole batch goes out in one ``LPUSH`` (all of it or none) on a connection of the
channel's own redis-py pool (its TLS, password, timeouts and health checks).  That
connection is kept between batches: taking one from the pool and giving it back
(redis-py's bookkeeping and its check for unread data, a system call) cost as much
CPU as the command itself.  It is the one kombu's publish used before, so the
process holds no connection more than kombu's publish did; a failed batch, or a
fork, lets it go.

Only for what kombu's channel would do the same way: kombu's own Redis channel
class (not Sentinel or a subclass), a body encoding (base64, kombu's default), no
global key prefix, no queue expiry; every other case keeps kombu's publish.
``tests/integration/test_publish.py`` compares the message with ``send_task``'s on a
real broker.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.uuid import uuid


class RedisPush:
    """Envelopes for one queue, pushed on a connection of kombu's channel's redis-py pool
    (the pool held: should kombu drop it after a failure, this one still reconnects)."""

    def __init__(
        self,
        pool: redis.ConnectionPool,
        *,
        key: str,
        routing_key: str,
        priority: int,
        delivery_mode: int,
        encode_body: Callable[[bytes], str],
        body_encoding: str,
    ) -> None:
        self._pool = pool
        self._lock = threading.Lock()  # the bridge's threads publish too
        self._held: Any = None  # a redis-py Connection, taken on the first push
        self._held_by = 0  # the process that took it: a forked child takes its own
        self._released = False
        self.key = key
        self._routing_key = routing_key
        self._priority = priority
        self._delivery_mode = delivery_mode
        self._encode_body = encode_body
        self._body_encoding = body_encoding

    @classmethod
    def for_channel(
        cls, channel: Any, *, exchange: str, routing_key: str, delivery_mode: int
    ) -> RedisPush | None:
        """The push for messages kombu would send on ``channel`` with an anonymous
        exchange to queue ``routing_key``; None where kombu's write could differ."""
        if type(channel) is not kombu_redis.Channel or exchange:
            return None
        kombu_channel: Any = channel  # kombu is untyped
        if kombu_channel.global_keyprefix or routing_key in kombu_channel._expires:
            return None
        # As kombu's prepare_message and _put: the channel's default priority, and
        # the list that priority lands on.
        priority = kombu_channel.default_priority
        level = kombu_channel._get_message_priority({"properties": {"priority": priority}})
        key = kombu_channel._q_for_pri(routing_key, level)
        body_encoding = kombu_channel.body_encoding
        if not body_encoding or body_encoding.lower() == "utf-8":
            return None  # kombu then stores the body bytes in its own JSON form
        codec = kombu_channel.codecs.get(body_encoding)
        return cls(
            kombu_channel.pool,
            key=key,
            routing_key=routing_key,
            priority=priority,
            delivery_mode=delivery_mode,
            encode_body=codec.encode,
            body_encoding=body_encoding,
        )

    def envelope(self, body: bytes, headers: dict[str, Any], *, task_id: str, reply_to: str) -> str:
        """One message as kombu's Redis channel stores it."""
        return json.dumps(
            {
                "body": self._encode_body(body),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "correlation_id": task_id,
                    "reply_to": reply_to,
                    "delivery_mode": self._delivery_mode,
                    "delivery_info": {"exchange": "", "routing_key": self._routing_key},
                    "priority": self._priority,
                    "body_encoding": self._body_encoding,
                    "delivery_tag": uuid(),
                },
            }
        )

    def push_unconfirmed(self, envelopes: Sequence[str]) -> Callable[[], None]:
        """Push a batch in order, in one command (the list gets all of it or none): write
        the ``LPUSH`` now; the returned call reads Redis's answer (and raises if there
        was none).

        Meanwhile the caller may do other work: on a busy machine the answer took
        longer to come than the rest of a no-op run (``bench.pool_cycle``).  The
        connection stays locked until the answer is read, so the caller must make the
        call, on every path.
        """
        self._lock.acquire()
        try:
            conn = self._held if self._held_by == os.getpid() else None
            if conn is None:
                conn = self._pool.get_connection()
                if not self._released:  # else a thread still had it after it was dropped
                    self._held, self._held_by = conn, os.getpid()
            try:
                # LPUSH adds its values one after another at the head; workers pop the
                # tail, so the first envelope is taken first, as with one LPUSH per message.
                conn.send_command("LPUSH", self.key, *envelopes)
            except BaseException:
                self._discard(conn)
                raise
        except BaseException:
            self._lock.release()
            raise
        answered = False

        def confirm() -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            try:
                conn.read_response()
            except BaseException:
                self._discard(conn)
                raise
            else:
                if self._held is not conn:
                    self._pool.release(conn)
            finally:
                self._lock.release()

        return confirm

    def _discard(self, conn: Any) -> None:
        # Whatever state the connection is in, it is not reused: the caller falls back
        # to kombu's publish, which takes one from the pool anew.
        self._held = None
        conn.disconnect()
        self._pool.release(conn)

    def release(self) -> None:
        """Give the kept connection back to the pool (when this push is dropped)."""
        with self._lock:
            self._released = True
            conn, self._held = self._held, None
            if conn is not None and self._held_by == os.getpid():
                self._pool.release(conn)
