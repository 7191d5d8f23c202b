"""The database (and Redis connections): schema, Alembic migrations, the
scans store with its compare-and-set statements, the fast statement path.

The store is one class, :class:`scanqueue.db.store.Store`, composed of rooms:
``engine`` (engines, errors, ``_tx``), ``rows`` (frozen records), ``scans``
(producers and users), ``claims`` (the bridge), ``runs`` (the worker and the
reaper) and ``leases`` (leadership without Redis).

The bottom stage: imports nothing of scanqueue but ``config`` and ``errors``.
"""
