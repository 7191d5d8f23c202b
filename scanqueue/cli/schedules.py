"""``scanqueue schedules …`` (docs/reference.md#schedules): recurring scans, fired by the leader
bridge.

``add`` validates with :func:`scanqueue.db.schedule_spec.validate_schedule` —
the API's validator — so both refuse the same definitions in the same words.
Handled errors (a name that exists, a bad expression or zone, an unknown name)
are :class:`~scanqueue.errors.ScanqueueError` subclasses: one line on stderr,
exit 1.  Giving both or neither of ``--cron`` and ``--every`` is a usage error
(exit 2).  Timestamps print as ISO-8601 UTC, like the scans'.
"""

from __future__ import annotations

import json
from datetime import datetime

import click

from scanqueue.config import Settings
from scanqueue.db.rows import iso
from scanqueue.db.schedule_spec import ON_MISSED, ON_OVERLAP, validate_schedule
from scanqueue.db.schedules import ScheduleRow
from scanqueue.db.store import Store, store_for


def _store() -> tuple[Settings, Store]:
    settings = Settings.from_env()
    return settings, store_for(settings.database_url)


def _emit_run(settings: Settings, row: ScheduleRow, scan_id: str, at: datetime) -> None:
    from scanqueue.observe.event_sender import emit_standalone

    emit_standalone(
        settings,
        "schedule.fired",
        scan_id,
        {"schedule": row.name, "scheduled_for": iso(at), "manual": True},
    )


def _print(row: ScheduleRow, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(row.to_json()))
    else:
        _print_table([row])


def _print_table(rows: list[ScheduleRow]) -> None:
    headers = (
        "NAME",
        "WHEN",
        "TZ",
        "PROVIDERS",
        "FRAMEWORKS",
        "STATE",
        "NEXT RUN (UTC)",
        "LAST SCAN",
    )
    table = [
        (
            r.name,
            r.cron if r.cron is not None else f"every {r.every_seconds}s",
            r.tz,
            ",".join(str(p) for p in r.providers),
            ",".join(str(f) for f in r.frameworks),
            "paused" if r.paused else "active",
            iso(r.next_run_at) or "",
            r.last_scan_id or "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    for line in (headers, *table):
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


@click.group("schedules")
def schedules_group() -> None:
    """Recurring scans, fired once per fire time by the leader bridge."""


@schedules_group.command("add")
@click.argument("name")
@click.option("--cron", default=None, help='Five-field cron expression, e.g. "0 3 * * *".')
@click.option("--every", "every", type=int, default=None, help="Period in seconds.")
@click.option("--tz", default="UTC", show_default=True, help="IANA zone the cron is read in.")
@click.option("--provider", "providers", multiple=True, required=True, help="Provider to scan.")
@click.option("--framework", "frameworks", multiple=True, help="Framework to check against.")
@click.option("--priority", type=int, default=0, show_default=True, help="Priority of its scans.")
@click.option("--key", default=None, help="scan_key of its scans.")
@click.option("--on-missed", type=click.Choice(ON_MISSED), default="once", show_default=True)
@click.option("--on-overlap", type=click.Choice(ON_OVERLAP), default="skip", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
def add_command(
    name: str,
    cron: str | None,
    every: int | None,
    tz: str,
    providers: tuple[str, ...],
    frameworks: tuple[str, ...],
    priority: int,
    key: str | None,
    on_missed: str,
    on_overlap: str,
    as_json: bool,
) -> None:
    """Add a schedule (exactly one of --cron and --every)."""
    if (cron is None) == (every is None):
        raise click.UsageError("give exactly one of --cron EXPR and --every SECONDS")
    spec = validate_schedule(
        {
            "name": name,
            "cron": cron,
            "every_seconds": every,
            "tz": tz,
            "providers": list(providers),
            "frameworks": list(frameworks),
            "priority": priority,
            "key": key,
            "on_missed": on_missed,
            "on_overlap": on_overlap,
        }
    )
    _, store = _store()
    _print(store.add_schedule(spec), as_json)


@schedules_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_command(as_json: bool) -> None:
    """List schedules with their next fire time."""
    _, store = _store()
    rows = store.list_schedules()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
    elif rows:
        _print_table(rows)


@schedules_group.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
def pause_command(name: str, as_json: bool) -> None:
    """Stop firing a schedule (its scans already made go on)."""
    _, store = _store()
    _print(store.pause_schedule(name), as_json)


@schedules_group.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
def resume_command(name: str, as_json: bool) -> None:
    """Fire a paused schedule again, from its next fire time after now."""
    _, store = _store()
    _print(store.resume_schedule(name), as_json)


@schedules_group.command("run")
@click.argument("name")
def run_command(name: str) -> None:
    """Enqueue the schedule's scan now and print its id."""
    settings, store = _store()
    row, scan_id, at = store.run_schedule_now(name)
    _emit_run(settings, row, scan_id, at)
    click.echo(scan_id)


@schedules_group.command("remove")
@click.argument("name")
def remove_command(name: str) -> None:
    """Delete a schedule (the scans it made stay)."""
    _, store = _store()
    store.remove_schedule(name)
