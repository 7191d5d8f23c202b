"""Retries of runner failures and timeouts (docs/reference.md#policies): whether, and how long to
wait.

A run that failed is retried while the scan has retries left (``retries <
SCANQUEUE_MAX_RETRIES``), unless its runner raised
:class:`~scanqueue.runners.api.PermanentError` (or the row itself is malformed,
which no retry fixes).  The delay is :func:`backoff_s` — ``SCANQUEUE_RETRY_BACKOFF
× 2^retries`` with jitter, capped at :data:`MAX_BACKOFF_S` — or, for
:class:`~scanqueue.runners.api.RetryLater` with ``after=``, the delay the runner
asked for.  ``RetryLater`` counts as a retry and is bounded by the same budget:
it is a runner saying "not now", and without a bound a runner that always says
so would keep a scan queued for ever.

The worker-loss budget (``SCANQUEUE_MAX_ATTEMPTS``) is separate; see
:mod:`scanqueue.db.runs`.  This module only decides; the compare-and-set that
puts a scan back is :meth:`scanqueue.db.runs.RunsMixin.retry_run`, called from
:mod:`scanqueue.worker.execute`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from scanqueue.runners.api import PermanentError, RetryLater

MAX_BACKOFF_S = 3600.0  # the contract's cap: no backoff waits longer than an hour
# 2^60 × any base is far past the cap: larger exponents add nothing but overflow.
_MAX_EXPONENT = 60


def backoff_s(
    retries: int, base_s: float, *, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """The delay before retry number ``retries + 1``: exponential, jittered, capped.

    ``base × 2^retries`` (``retries`` = retries so far), capped at an hour, then
    "equal jitter": a uniform draw from its upper half.  The jitter spreads scans
    that failed together (a provider outage) so they do not return together;
    keeping the lower half means a retry never comes back almost at once.
    """
    if base_s <= 0:
        return 0.0
    ceiling = min(MAX_BACKOFF_S, base_s * 2.0 ** min(max(retries, 0), _MAX_EXPONENT))
    return min(ceiling, max(ceiling / 2.0, uniform(ceiling / 2.0, ceiling)))


@dataclass(frozen=True)
class RetryDecision:
    """What to do with a failed run: retry after ``delay_s``, or (None) fail the scan."""

    delay_s: float | None

    @property
    def retry(self) -> bool:
        return self.delay_s is not None


def decide(
    exc: BaseException | None,
    *,
    retries: int,
    max_retries: int,
    base_s: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> RetryDecision:
    """Retry a failed run (``exc`` None: it timed out) or let it fail."""
    if isinstance(exc, PermanentError) or retries >= max_retries:
        return RetryDecision(None)
    if isinstance(exc, RetryLater) and exc.after is not None:
        return RetryDecision(exc.after)
    return RetryDecision(backoff_s(retries, base_s, uniform=uniform))
