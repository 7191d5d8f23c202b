"""From table to broker: watchers (poll, LISTEN), leadership, the bridge
(claim then publish) and its maintenance (reaper, re-send).

Each loop is a ``run_once`` plus a thin loop.  It is handed a publish
callable and never imports Celery or the worker; it uses ``observe`` and ``db``.
"""
