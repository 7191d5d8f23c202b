"""The Celery side: the app, the one task, a scan's run, bootsteps, autoscaler,
the embedded SQLite broker.

``execute`` (a run's state machine), ``endings`` (how a run ends), ``lease``
(keeping its lease) and ``retry`` (retries and their backoff) are Celery-free;
the rest adapts them to Celery.
May use ``dispatch`` (the embedded bridge step), ``runners``, ``observe`` and
``db``; ``dispatch`` never imports this package.
"""
