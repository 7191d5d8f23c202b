"""The database (and Redis connections): schema, Alembic migrations, the
scans store with its compare-and-set statements, the fast statement path.

The bottom stage: imports nothing of scanqueue but ``config`` and ``errors``.
"""
