"""Webhook delivery (docs/reference.md#webhooks): the leader's run_once, fan-out and
sending.

On each maintenance tick the leader calls :meth:`WebhookDispatcher.run_once`:

1. **fan-out** — finished scans not yet notified become outbox rows, one per
   matching receiver (:meth:`WebhooksMixin.fan_out`, at most 200 scans a tick);
2. **claim and hand off** — due outbox rows are claimed (compare-and-set) and
   handed to a small thread pool; run_once returns at once.  At most
   :data:`MAX_IN_FLIGHT` rows are in flight, so a receiver that hangs costs a
   few threads for :data:`DELIVERY_TIMEOUT_S`, never the maintenance loop (the
   reaper, schedules, retention) and never a run: workers only write their
   outcome to ``scans``, and nothing here is in their path.

Each POST carries the outbox row's exact JSON text with
``Content-Type: application/json``, ``X-Scanqueue-Delivery`` (one id per
(receiver, scan), the same on every retry), ``X-Scanqueue-Attempt`` and
``X-Scanqueue-Signature``: the hex HMAC-SHA256 of the body bytes under the
receiver's secret (:func:`sign`).  A 2xx answer is delivered; anything else
(another status, a redirect, a refused connection, a timeout) is retried with
backoff (:func:`scanqueue.db.webhook_spec.retry_delay_s`) up to 10 tries (~51 min),
then given up.  Redirects are not followed.  The secret and the token never
appear in a payload, a log line or an error kept in the outbox; URLs are logged
with any password masked.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from scanqueue.config import mask_url
from scanqueue.db.store import Store
from scanqueue.db.webhook_spec import FANOUT_BATCH, MAX_DELIVERY_ATTEMPTS, DueDelivery

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 10.0  # connect + answer, per POST
DELIVERY_THREADS = 4
MAX_IN_FLIGHT = 16  # claimed rows waiting for or being sent, at most
USER_AGENT = "scanqueue-webhooks/1"
SIGNATURE_HEADER = "X-Scanqueue-Signature"
DELIVERY_HEADER = "X-Scanqueue-Delivery"
ATTEMPT_HEADER = "X-Scanqueue-Attempt"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Scanqueue-Signature`` value: hex HMAC-SHA256 of ``body`` under ``secret``."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx is an answer like any other non-2xx: retried later


_opener = urllib.request.build_opener(_NoRedirect)


def post(delivery: DueDelivery, timeout_s: float = DELIVERY_TIMEOUT_S) -> str | None:
    """POST one delivery; None when the receiver answered 2xx, else why not (one line)."""
    body = delivery.payload.encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked when added
        delivery.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            DELIVERY_HEADER: delivery.delivery_id,
            ATTEMPT_HEADER: str(delivery.attempts),
            SIGNATURE_HEADER: sign(delivery.secret, body),
        },
    )
    try:
        with _opener.open(request, timeout=timeout_s) as response:
            response.read(65536)
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        exc.close()
    except urllib.error.URLError as exc:
        return f"cannot reach the receiver: {exc.reason}"
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except OSError as exc:
        return f"cannot reach the receiver: {exc.strerror or type(exc).__name__}"
    except http.client.HTTPException as exc:  # e.g. a status line that is not HTTP
        return f"the receiver's answer is not HTTP: {type(exc).__name__}"
    except ValueError:  # a URL urllib cannot open (its text would show the URL)
        return "cannot send: the URL cannot be opened"
    if 200 <= status < 300:
        return None
    return f"the receiver answered HTTP {status}"


class WebhookDispatcher:
    """Fan-out and delivery for one leader; :meth:`run_once` never waits for a receiver."""

    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float = DELIVERY_TIMEOUT_S,
        threads: int = DELIVERY_THREADS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_attempts: int = MAX_DELIVERY_ATTEMPTS,
        retry_in_s: Callable[[int], float] | None = None,
        fanout_batch: int = FANOUT_BATCH,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.retry_in_s = retry_in_s
        self.fanout_batch = fanout_batch
        self.report = report
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="scanqueue-webhook")
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False

    def run_once(self) -> tuple[int, int]:
        """Fan out, then hand due deliveries to the pool; returns (fanned-out scans, handed)."""
        fanned, _made = self.store.fan_out(self.fanout_batch)
        with self._lock:
            if self._closed:
                return fanned, 0
            room = self.max_in_flight - len(self._in_flight)
        claimed = self.store.claim_due_deliveries(room) if room > 0 else []
        with self._lock:
            for delivery in claimed:
                self._in_flight.add(delivery.id)
        for delivery in claimed:
            self._pool.submit(self._deliver, delivery)
        return fanned, len(claimed)

    def _deliver(self, delivery: DueDelivery) -> None:
        try:
            error = post(delivery, self.timeout_s)
            retry_in = None
            if error is not None and self.retry_in_s is not None:
                retry_in = self.retry_in_s(delivery.attempts)
            outcome = self.store.record_delivery(
                delivery, error, max_attempts=self.max_attempts, retry_in_s=retry_in
            )
            if error is None:
                log.debug("webhook %s: delivered scan %s", mask_url(delivery.url), delivery.scan_id)
            elif outcome == "given_up":
                log.warning(
                    "webhook %s: gave up on scan %s after %d attempts: %s",
                    mask_url(delivery.url),
                    delivery.scan_id,
                    delivery.attempts,
                    error,
                )
            else:
                log.info(
                    "webhook %s: scan %s attempt %d failed (%s); retrying later",
                    mask_url(delivery.url),
                    delivery.scan_id,
                    delivery.attempts,
                    error,
                )
            if self.report is not None:
                self.report(outcome)
        except Exception as exc:  # the claim runs out and the row is sent again
            log.warning("webhook %s: delivery not recorded: %s", mask_url(delivery.url), exc)
        finally:
            with self._lock:
                self._in_flight.discard(delivery.id)
                self._idle.notify_all()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (tests, shutdown); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._in_flight, timeout_s)

    def close(self) -> None:
        """Take no more work; deliveries already sending finish in the background."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
