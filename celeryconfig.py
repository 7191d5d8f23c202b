"""Deployment overrides for scanqueue's Celery app (honoured when importable).

scanqueue's built-in defaults (scanqueue/celery.py) are already the reliable
ones — late acks, reject on worker lost, prefetch 1 — so a wheel installed
without this file behaves correctly.  This file holds what a deployment tunes;
every value is read from the environment so one image serves every stage.
"""

from __future__ import annotations

import os

# Task events feed Flower's live view; off by default because they cost broker
# traffic on every task (Flower also switches them on itself on Redis).
worker_send_task_events = os.environ.get("CELERY_TASK_EVENTS", "").lower() in ("1", "true", "yes")

# On SIGTERM (platforms give 30 s), give running scans this long to finish before
# their messages are handed back; keep it under the platform's grace period.
worker_soft_shutdown_timeout = float(os.environ.get("CELERY_SOFT_SHUTDOWN_TIMEOUT", "20"))
