"""The Celery side: the app, the one task, a scan's run, bootsteps, autoscaler,
the embedded SQLite broker.

``execute`` is Celery-free (a run's state machine); the rest adapts it to
Celery.  May use ``dispatch`` (the embedded bridge step), ``runners``,
``observe`` and ``db``; ``dispatch`` never imports this package.
"""
