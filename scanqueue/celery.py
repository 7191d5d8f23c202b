"""Where ``celery -A scanqueue`` finds the app (Celery looks for ``scanqueue.celery``).

The app itself lives in :mod:`scanqueue.worker.app`.
"""

from scanqueue.worker.app import app

__all__ = ["app"]
