"""The bridge's publishing: one ``run_scan(scan_id)`` message per claimed id, a batch
at a time, in claim order.

Owns the message. Celery's ``send_task`` spent about 0.3 ms of CPU per message here
(routing, options, the repr of the arguments, the retry wrapper, a result object):
under a backlog that was a quarter of the worker's main process, where the embedded
bridge publishes, and it held the GIL the consumer needs. Every message is the same
but for the scan id and the task id, so the rest is worked out once and a message
costs a uuid, a small JSON body and kombu's publish (about 0.1 ms). On a Redis
broker, once kombu's first publish has declared the queue, a batch skips kombu's
layers too: one ``LPUSH`` of kombu's own envelope
(:mod:`scanqueue.dispatch.redis_push`; half the CPU again), with kombu's publish as
the fallback when that connection fails. The headers are Celery's task protocol 2,
as ``send_task`` writes them (``tests/integration/test_publish.py`` compares the two
on a real broker). Whenever something could make ``send_task``'s message differ — a
receiver of ``before_task_publish`` or ``after_task_publish`` (tracing
instrumentations add headers there), ``task_send_sent_event``, task routes,
compression, another serializer or protocol, a default priority — the batch goes
through ``send_task`` instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import redis
from celery import signals
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu.entity import maybe_delivery_mode
from kombu.utils.uuid import uuid

from scanqueue.config import TASK_NAME
from scanqueue.dispatch.bridge import PublishError
from scanqueue.dispatch.redis_push import RedisPush

log = logging.getLogger(__name__)


def _settled() -> None:
    """The answer of a batch that was sent and answered at once."""


# What the protocol-2 body carries after the arguments (no workflow).
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Ids whose argsrepr needs no saferepr: characters repr() writes as they are, inside
# single quotes (no quote, backslash, control or non-ASCII character), and far
# shorter than where saferepr cuts.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:@+/=-]+")
_PLAIN_ID_MAX = 200


class TaskPublisher:
    """``run_scan`` messages for one Celery app and queue."""

    def __init__(self, app: Any, queue: str | None = None) -> None:
        self.app = app
        self.queue_name = queue or app.conf.task_default_queue
        queue_obj = app.amqp.queues[self.queue_name]
        # As Celery's send_task_message: a direct exchange becomes the anonymous one.
        if (queue_obj.exchange.type or "direct") == "direct":
            self.exchange, self.routing_key = "", self.queue_name
        else:
            self.exchange = queue_obj.exchange.name or app.conf.task_default_exchange
            self.routing_key = queue_obj.routing_key or app.conf.task_default_routing_key
        self.delivery_mode = queue_obj.exchange.delivery_mode or app.conf.task_default_delivery_mode
        self.declare = [queue_obj]
        self.origin = anon_nodename()
        # argsrepr as Celery writes it (its saferepr differs from repr() for quotes,
        # backslashes and non-ASCII text, which a foreign row's id may hold).
        self.argsrepr_maxsize = app.amqp.argsrepr_maxsize
        self.repr_maxlevels = app.conf.task_repr_maxlevels
        # Read once: Celery's configuration lookups cost microseconds each, and the
        # settings do not change once the app is set up (the signals can).
        conf = app.conf
        self.retry = bool(conf.task_publish_retry)
        self.retry_policy = dict(conf.task_publish_retry_policy or {})
        self._declared_on: Any = None  # the channel the queue was last declared on
        # The short way to a Redis broker, set up after kombu's first publish there.
        self._push: RedisPush | None = None
        self._push_checked_on: Any = None  # the channel it was last set up from
        self._plain_settings = not (
            conf.task_send_sent_event
            or conf.task_routes
            or conf.task_compression
            or conf.task_serializer != "json"
            or conf.task_protocol != 2
            or conf.task_default_priority is not None
        )

    def plain(self) -> bool:
        """Whether the message is the plain one (else ``send_task`` builds it)."""
        return self._plain_settings and not (
            signals.before_task_publish.receivers or signals.after_task_publish.receivers
        )

    @property
    def pushes_directly(self) -> bool:
        """Whether the next plain batch takes the short way to a Redis broker."""
        return self._push is not None

    def __call__(self, scan_ids: Sequence[str]) -> None:
        """Publish one message per id, in order; PublishError says how many went."""
        self.send_early(scan_ids)()

    def send_early(self, scan_ids: Sequence[str]) -> Callable[[], None]:
        """Publish as a call does, but on the short way leave the broker's answer
        unread: the returned call reads it (and publishes through kombu if there was
        none), raising PublishError as a call would.  It must be made, on every path:
        the connection waits for it.  Elsewhere the batch is sent at once and the
        returned call does nothing."""
        plain = self.plain()
        push = self._push  # read once: the maintenance thread publishes too
        if plain and push is not None:
            try:
                confirm = push.push_unconfirmed(self._envelopes(push, scan_ids))
            except Exception as exc:
                self._short_way_failed(push, exc)
            else:

                def settle() -> None:
                    try:
                        confirm()
                    except Exception as exc:
                        self._short_way_failed(push, exc)
                        self._publish_with_kombu(scan_ids, plain)

                return settle
        self._publish_with_kombu(scan_ids, plain)
        return _settled

    def _short_way_failed(self, push: RedisPush, exc: Exception) -> None:
        # kombu's publish, next, retries as configured and re-declares the queue.
        # After a failed connection the short way is set up again once kombu succeeds;
        # after anything else, not on this channel.
        lost = isinstance(exc, redis.RedisError)
        log.warning(
            "publishing through kombu: %s (%s: %s)",
            "the broker connection failed" if lost else "the short way failed",
            type(exc).__name__,
            exc,
        )
        self._drop_push(push)
        if lost:
            self._push_checked_on = None

    def _drop_push(self, push: RedisPush) -> None:
        if self._push is push:
            self._push = None
        push.release()

    def _envelopes(self, push: RedisPush, scan_ids: Sequence[str]) -> list[str]:
        reply_to = self.app.thread_oid
        envelopes = []
        for scan_id in scan_ids:
            task_id = uuid()
            envelopes.append(
                push.envelope(
                    self._body(scan_id).encode(),
                    self._headers(scan_id, task_id),
                    task_id=task_id,
                    reply_to=reply_to,
                )
            )
        return envelopes

    def _publish_with_kombu(self, scan_ids: Sequence[str], plain: bool) -> None:
        app = self.app
        sent = 0
        batched = False
        try:
            with app.producer_or_acquire() as producer:
                channel = producer.channel
                # One round trip (Redis pipeline) or one commit (SQLite broker) for the
                # whole claim instead of one per message; other transports send at once,
                # and so does a single message (a batch of one cost it about 0.1 ms of CPU).
                batched = len(scan_ids) > 1 and callable(
                    getattr(producer.channel, "create_publish_batch", None)
                )
                with producer.batch(max_size=len(scan_ids)) if batched else nullcontext():
                    if plain:
                        reply_to = app.thread_oid
                        # The queue is declared before the first message on a channel
                        # (kombu caches it per connection too, but its check costs a
                        # message about 0.03 ms).
                        declare = channel is not self._declared_on
                        for scan_id in scan_ids:
                            self._publish(producer, scan_id, reply_to, declare=declare)
                            declare = False
                            sent += 1
                        self._declared_on = channel
                    else:
                        for scan_id in scan_ids:
                            # send_task: the publishing process need not import the task.
                            app.send_task(
                                TASK_NAME, args=(scan_id,), producer=producer, queue=self.queue_name
                            )
                            sent += 1
        except Exception as exc:
            # A batch that failed may have been partly written: count none as sent, so
            # all are dispatched again (a duplicate message is harmless; a lost one is not).
            raise PublishError(0 if batched else sent, exc) from exc
        if plain and channel is not self._push_checked_on:
            # The queue is declared on this broker now: later batches may take the
            # short way, where the channel allows it.
            self._push_checked_on = channel
            if self._push is not None:
                self._drop_push(self._push)
            self._push = self._short_way(channel)

    def _short_way(self, channel: Any) -> RedisPush | None:
        try:
            return RedisPush.for_channel(
                channel,
                exchange=self.exchange,
                routing_key=self.routing_key,
                delivery_mode=maybe_delivery_mode(self.delivery_mode),  # type: ignore[no-untyped-call]
            )
        except Exception as exc:  # kombu's internals moved: its publish stays
            log.warning("publishing through kombu only (%s: %s)", type(exc).__name__, exc)
            return None

    def _body(self, scan_id: str) -> str:
        return json.dumps([[scan_id], {}, _EMBED])

    def _headers(self, scan_id: str, task_id: str) -> dict[str, Any]:
        return {
            "lang": "py",
            "task": TASK_NAME,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": self._argsrepr(scan_id),
            "kwargsrepr": "{}",
            "origin": self.origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }

    def _argsrepr(self, scan_id: str) -> str:
        # Celery's saferepr costs about 0.1 ms a message; for an id of plain characters,
        # well under the size it cuts at, its result is repr()'s.
        if len(scan_id) <= _PLAIN_ID_MAX <= self.argsrepr_maxsize and _PLAIN_ID.fullmatch(scan_id):
            return f"('{scan_id}',)"
        return str(saferepr((scan_id,), self.argsrepr_maxsize, maxlevels=self.repr_maxlevels))

    def _publish(self, producer: Any, scan_id: str, reply_to: str, *, declare: bool) -> None:
        task_id = uuid()
        producer.publish(
            self._body(scan_id),
            exchange=self.exchange,
            routing_key=self.routing_key,
            content_type="application/json",
            content_encoding="utf-8",
            headers=self._headers(scan_id, task_id),
            delivery_mode=self.delivery_mode,
            declare=self.declare if declare else None,
            retry=self.retry,
            retry_policy=self.retry_policy,
            correlation_id=task_id,
            reply_to=reply_to,
        )


def make_publisher(app: Any, queue: str | None = None) -> TaskPublisher:
    """A publish callable: one ``run_scan(scan_id)`` message per id, on ``queue``
    (default: the app's default queue)."""
    return TaskPublisher(app, queue)
