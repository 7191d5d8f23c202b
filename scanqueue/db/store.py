"""The store: every SQL statement scanqueue runs against ``scans``, behind one class.

Callers hold one :class:`Store` per process and database (:func:`store_for`,
because Celery's prefork pool forks after start).  It is composed of rooms,
each a mixin in a module of its own:

* :mod:`scanqueue.db.engine` — engines, driver errors → :class:`UnavailableError`
  (here and nowhere else), retries, ``_tx`` and the health checks;
* :mod:`scanqueue.db.rows` — the frozen records rows become (:class:`ScanRow`, …);
* :mod:`scanqueue.db.scans` — producers and users: enqueue, get, list, cancel, counts;
* :mod:`scanqueue.db.claims` — the bridge: claims under the window and the policies,
  re-send, workers;
* :mod:`scanqueue.db.policies` — per-key limits, pauses, keys' activity, intake;
* :mod:`scanqueue.db.runs` — the worker and the reaper: start, heartbeat, finish, retry;
* :mod:`scanqueue.db.leases` — leadership without Redis;
* :mod:`scanqueue.db.schedules` — ``scan_schedules`` and the scans they fire;
* :mod:`scanqueue.db.webhooks` — webhooks, their outbox, fan-out and deliveries;
* :mod:`scanqueue.db.retention` — which old finished scans go, deleted in batches.

Each state change is one compare-and-set statement keyed on
``(id, status[, attempts])``, so a duplicate message, a zombie run, the reaper
and a cancel can race freely: exactly one of them wins each transition.

    queued ──start_run──▶ running ──finish_run──▶ completed | failed
      ▲  │                  │ │
      │  └────cancel────────┼─┴──cancel──▶ canceled
      ├──reap (attempts - retries < max)   reap (≥ max) ──▶ failed
      └──retry_run (retries + 1, run_after = now + backoff)
"""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine

from scanqueue.db.claims import ClaimsMixin
from scanqueue.db.leases import LeasesMixin
from scanqueue.db.retention import RetentionMixin
from scanqueue.db.runs import RunsMixin
from scanqueue.db.scans import ScansMixin
from scanqueue.db.schedules import SchedulesMixin
from scanqueue.db.webhooks import WebhooksMixin


class Store(
    ScansMixin,
    ClaimsMixin,
    RunsMixin,
    LeasesMixin,
    SchedulesMixin,
    WebhooksMixin,
    RetentionMixin,
):
    """All statements against ``scans``; one instance per process and database."""

    def __init__(self, database_url: str, engine: Engine | None = None) -> None:
        super().__init__(database_url, engine)
        self._build_claim_statement()
        self._build_run_statements()


_stores: dict[tuple[int, str], Store] = {}
_stores_lock = threading.Lock()


def store_for(database_url: str) -> Store:
    """This process's Store for ``database_url`` (rebuilt after a fork)."""
    key = (os.getpid(), database_url)
    with _stores_lock:
        found = _stores.get(key)
        if found is None:
            for stale in [k for k in _stores if k[0] != key[0]]:
                # Inherited from the parent: drop the pool without closing its sockets,
                # which still belong to the parent.
                _stores.pop(stale).dispose(close=False)
            found = _stores[key] = Store(database_url)
        return found
