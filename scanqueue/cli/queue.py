"""``scanqueue queue [--json]``: what the queue holds and what limits it
(docs/reference.md#policies).

Rows per status (the ones whose status scanqueue does not know — another
program wrote ``QUEUED`` — counted under ``unknown`` and named by value,
because nothing will ever pick them up), the depth and the oldest queued
scan's age, pauses, running and in-flight scans per key with their limits,
and the live workers with their slots.  The JSON object is the one
``GET /api/v1/queue`` answers (:mod:`scanqueue.db.queue_view`).
"""

from __future__ import annotations

import json
from typing import Any

import click

from scanqueue.config import Settings
from scanqueue.db.queue_view import queue_snapshot as build_snapshot
from scanqueue.db.store import store_for
from scanqueue.dispatch.bridge import WORKER_STALE_AFTER_S


def queue_snapshot(settings: Settings) -> dict[str, Any]:
    """The ``--json`` object (see :func:`scanqueue.db.queue_view.queue_snapshot`)."""
    return build_snapshot(
        store_for(settings.database_url), settings.max_running_per_key, WORKER_STALE_AFTER_S
    )


@click.command("queue")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def queue_command(as_json: bool) -> None:
    """Show the queue: scans per status, pauses, keys and their limits, live workers."""
    snapshot = queue_snapshot(Settings.from_env())
    if as_json:
        click.echo(json.dumps(snapshot))
        return
    statuses: dict[str, int] = snapshot["statuses"]
    width = max(len(s) for s in statuses)
    click.echo(f"{'STATUS'.ljust(width)}  SCANS")
    for status, n in statuses.items():
        click.echo(f"{status.ljust(width)}  {n}")
    click.echo(f"oldest queued: {snapshot['oldest_queued_age_s']:.1f}s ago")
    if snapshot["paused_all"]:
        click.echo("PAUSED: the whole queue (scanqueue resume)")
    default = snapshot["default_limit"]
    click.echo(f"per-key limit (default): {default or 'none'}")
    keys: list[dict[str, Any]] = snapshot["keys"]
    if keys:
        kw = max(3, *(len(k["key"]) for k in keys))
        click.echo(f"{'KEY'.ljust(kw)}  RUNNING  IN_FLIGHT  LIMIT  PAUSED")
        for k in keys:
            click.echo(
                f"{k['key'].ljust(kw)}  {k['running']:<7}  {k['in_flight']:<9}"
                f"  {k['limit'] or 'none'!s:<5}  {'yes' if k['paused'] else ''}".rstrip()
            )
    workers: list[dict[str, Any]] = snapshot["workers"]
    click.echo(f"live workers: {len(workers)}, slots {sum(w['slots'] for w in workers)}")
    for w in workers:
        click.echo(
            f"  {w['id']}  {w['hostname']}  slots {w['slots']}  heartbeat {w['heartbeat_at']}"
        )
    unknown: dict[str, int] = snapshot["unknown_statuses"]
    if unknown:
        listed = ", ".join(f"{status!r}: {n}" for status, n in unknown.items())
        click.echo(
            f"warning: {sum(unknown.values())} scan(s) with a status scanqueue does not know"
            f" ({listed}); nothing will run them",
            err=True,
        )
