"""The Celery app: ``celery -A scanqueue worker`` finds it here.

Owns the Celery settings (reliable defaults, each explained, then the
deployment's ``celeryconfig.py`` on top when one is importable), the worker's
extra command-line option ``--without-bridge``, the worker bootsteps and the
process signals.  The task itself is in :mod:`scanqueue.worker.task`, the bootsteps
in :mod:`scanqueue.worker.steps`.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import ssl
import sys
from typing import Any

import click
from celery import Celery, signals

from scanqueue.config import Settings, mask_url, warn_unknown_variables
from scanqueue.errors import ConfigError
from scanqueue.worker import broker_sqlite
from scanqueue.worker.harden import make_non_dumpable
from scanqueue.worker.heap import freeze_startup_objects

log = logging.getLogger(__name__)


def _settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        # One line and exit 1, not Celery's "Unable to load celery application" traceback.
        print(f"scanqueue: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


warn_unknown_variables()
settings = _settings_or_exit()
# The worker's environment holds DATABASE_URL's password: its scanners (same user)
# must not read /proc/<pid>/environ. Inherited by the pool processes it forks.
make_non_dumpable()
QUEUE = settings.queue
broker_sqlite.register()


def celery_defaults(s: Settings) -> dict[str, Any]:
    """Built-in Celery settings; a deployment's celeryconfig.py may override any."""
    conf: dict[str, Any] = {
        "broker_url": s.broker_url,
        "task_default_queue": QUEUE,
        # The scans table holds every outcome; Celery results would be a second truth.
        "task_ignore_result": True,
        "result_backend": None,
        "accept_content": ["json"],
        "task_serializer": "json",
        # Ack after the run, so a worker that dies mid-scan hands the message back.
        "task_acks_late": True,
        # ... also when only its pool process was killed. The redelivery finds the row
        # no longer 'queued' and does nothing, so this can never loop.
        "task_reject_on_worker_lost": True,
        # A worker reserves no more scans than it is about to run; others stay with
        # the broker for idle workers.
        "worker_prefetch_multiplier": 1,
        # A broker blip must not kill running scans: their compare-and-set protects
        # the row if the message is redelivered meanwhile.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        # At runtime reconnect for ever (a Redis restart must not stop workers); the
        # startup wait is bounded by SCANQUEUE_CONNECT_TIMEOUT (worker_steps).
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": True,
        "broker_transport_options": {},
        # Grows with the backlog of queued scans, not only with reserved messages
        # (active with --autoscale, which the worker defaults to).
        "worker_autoscaler": "scanqueue.worker.autoscale:QueueDepthAutoscaler",
    }
    if s.broker_url.startswith(("redis://", "rediss://")):
        # Unacked messages come back after this long even while still running; the
        # compare-and-set absorbs that duplicate, and lost work is found by the
        # reaper (heartbeats), not by this timeout.
        conf["broker_transport_options"] = {"visibility_timeout": 3600}
    if s.broker_url.startswith("rediss://"):
        from scanqueue.db.redisconn import ssl_cert_reqs_constant

        # Verify unless the URL says otherwise, as redis-py does for the lock and the
        # event stream (kombu alone would fall back to no verification, with a warning).
        reqs = ssl_cert_reqs_constant(s.broker_url)
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED if reqs is None else reqs}
    if s.broker_url.startswith(("sqla+", "sqlalchemy+")):
        conf["broker_transport_options"] = {"polling_interval": s.broker_poll_every_s}
    return conf


def _deployment_overrides() -> dict[str, Any]:
    """Settings from a ``celeryconfig`` module on the path (the repo root has one)."""
    if importlib.util.find_spec("celeryconfig") is None:
        return {}
    module = importlib.import_module("celeryconfig")
    return {k: getattr(module, k) for k in dir(module) if not k.startswith("_") and k.islower()}


app = Celery("scanqueue", include=["scanqueue.worker.task"])
app.conf.update(celery_defaults(settings))
app.conf.update(_deployment_overrides())


def _default_autoscale() -> None:
    """Without ``--autoscale`` the worker autoscales between the configured bounds."""
    from celery.bin.worker import worker as worker_command

    for param in worker_command.params:
        # click marks "no default" with a sentinel (not always None): only a string
        # default is someone's explicit choice.
        if param.name == "autoscale" and not isinstance(param.default, str):
            param.default = f"{settings.max_concurrency},{settings.concurrency}"


_default_autoscale()

app.user_options["worker"].add(
    click.Option(
        ["--without-bridge"],
        is_flag=True,
        default=False,
        help="Do not run the embedded bridge (when a separate `scanqueue bridge` runs).",
    )
)


def _register_steps() -> None:
    from scanqueue.worker.metrics_step import MetricsStep
    from scanqueue.worker.steps import BridgeStep, ReadinessStep, RegistryStep

    app.steps["worker"].add(ReadinessStep)
    app.steps["worker"].add(RegistryStep)
    app.steps["worker"].add(BridgeStep)
    app.steps["worker"].add(MetricsStep)


_register_steps()


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _in_pool_process(**_: Any) -> None:
    from scanqueue.worker import lease

    make_non_dumpable()  # inherited through fork already; again in case a pool spawned
    # A pool process may end itself to terminate a run that ignores its stop signal.
    lease.terminate_process_when_overdue = True
    # Build the runner, observers and database connection now rather than on the
    # first scan, whose pickup latency would otherwise carry them (~0.4 s).
    from scanqueue.worker.runtime import worker_runtime

    try:
        worker_runtime(settings).store.ping()
    except Exception as exc:  # the first scan will retry and report it
        log.warning("pool process warm-up failed: %s", exc)
    freeze_startup_objects()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _in_main_process_ready(**_: Any) -> None:
    # Every bootstep has started (the bridge too): what the process holds now stays.
    freeze_startup_objects()


@signals.celeryd_init.connect  # type: ignore[untyped-decorator]
def _check_runner_and_announce(**_: Any) -> None:
    # Sent before Celery's own start-up output: a runner that does not import stops
    # the worker with one line, like any other bad setting.
    from scanqueue.identity import worker_identity
    from scanqueue.runners.api import load_runner

    worker_identity()  # fixed before the pool forks, so pool processes extend it

    try:
        load_runner(settings.runner)
    except ConfigError as exc:
        print(f"scanqueue: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    atexit.register(_hand_back_interrupted_runs)
    log.info(
        "scanqueue worker: database %s, broker %s",
        mask_url(settings.database_url),
        mask_url(settings.broker_url),
    )


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _pool_process_down(pid: int | None = None, **_: Any) -> None:
    # Sent in the pool process just before it leaves with os._exit, which skips
    # atexit: the last scans' queued events are written now or never.
    try:
        from scanqueue.observe.event_sender import flush_pending_events

        if not flush_pending_events():
            log.warning("pool process %s exits with scan events not yet written", pid)
    except Exception as exc:  # the process is leaving either way
        log.warning("could not write pending scan events: %s", exc)
    lineage = sys.modules.get("scanqueue.observe.lineage")  # loaded only when configured
    if lineage is not None:
        try:
            if not lineage.flush_all():
                log.warning("pool process %s exits with lineage events not yet sent", pid)
        except Exception as exc:
            log.warning("could not send pending lineage events: %s", exc)
    if pid is not None:
        # A no-op outside multiprocess mode.
        from scanqueue.observe.metrics_multiprocess import mark_process_dead

        mark_process_dead(pid)


@signals.after_setup_logger.connect  # type: ignore[untyped-decorator]
@signals.after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _json_logs(logger: logging.Logger, **_: Any) -> None:
    if settings.log_format == "json":
        from scanqueue.observe.logs import use_json_in_celery

        use_json_in_celery(logger)


def _hand_back_interrupted_runs() -> None:
    """Re-queue scans this worker's pool was still running when it stopped.

    A warm shutdown lets runs finish; a cold one (or a soft-shutdown timeout)
    interrupts them. Handing them back now saves waiting out their lease.
    Registered with atexit in the worker's main process: Celery sends no
    signal after a cold shutdown has terminated the pool.
    """
    from scanqueue.db.store import store_for
    from scanqueue.identity import worker_identity

    try:
        handed = store_for(settings.database_url).hand_back(worker_identity())
    except Exception as exc:  # the reaper re-queues them after the lease instead
        log.warning("could not hand back interrupted scans: %s", exc)
        return
    for scan_id in handed:
        log.warning("scan %s was interrupted by shutdown; re-queued", scan_id)
