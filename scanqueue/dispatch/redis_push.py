"""The Redis broker's own write of a batch: kombu's message envelope, one ``LPUSH``.

Owns the short way to the Redis broker.  kombu's publish of one message on Redis
is a single ``LPUSH`` of a JSON envelope, but getting there costs about 550
Python calls (the producer, the virtual channel, a new redis-py client object per
message); in a process that was idle (a pickup) that was about 1 ms of a message's
wall time, and 0.15 ms of CPU back to back.  Here the envelope is written as
kombu's Redis channel writes it, with the settings read off that channel once, and
the whole batch goes out in one ``LPUSH`` (all of it or none) on the channel's own
redis-py connection pool (its TLS, password, timeouts and health checks, and no
connection more than kombu's publish holds).

Only for what kombu's channel would do the same way: kombu's own Redis channel
class (not Sentinel or a subclass), a body encoding (base64, kombu's default), no
global key prefix, no queue expiry; every other case keeps kombu's publish.
``tests/integration/test_publish.py`` compares the message with ``send_task``'s on a
real broker.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.uuid import uuid


class RedisPush:
    """Envelopes for one queue, pushed through kombu's channel's redis-py pool (held:
    should kombu drop that pool after a failure, this one still reconnects; a failed
    connection is dropped by redis-py itself)."""

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
        self._client = redis.Redis(connection_pool=pool)
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

    def push(self, envelopes: Sequence[str]) -> None:
        """Push a batch in order, in one command: the list gets all of it or none."""
        # LPUSH adds its values one after another at the head; workers pop the tail,
        # so the first envelope is taken first, as with one LPUSH per message.
        self._client.lpush(self.key, *envelopes)
