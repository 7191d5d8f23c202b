"""``scanqueue queue [--json]``: what the queue holds, per status (CONTRACT §7).

Today it shows the rows per status, with the ones whose status scanqueue does
not know (another program wrote ``QUEUED``) counted under ``unknown`` and named
by value, because nothing will ever pick them up.  Later issues add running per
key, limits, pauses and the live workers as further keys of the same JSON
object and further sections of the same table.
"""

from __future__ import annotations

import json
from typing import Any

import click

from scanqueue.config import Settings
from scanqueue.db.schema import STATUSES
from scanqueue.db.store import store_for

UNKNOWN_SAMPLE = 20  # ids of unknown-status rows shown


def queue_snapshot(settings: Settings) -> dict[str, Any]:
    """The ``--json`` object: ``depth`` (queued), ``statuses`` and ``unknown_statuses``."""
    store = store_for(settings.database_url)
    counts = store.count_by_status()
    statuses = {status: counts.get(status, 0) for status in STATUSES}
    unknown = {status: n for status, n in sorted(counts.items()) if status not in STATUSES}
    statuses["unknown"] = sum(unknown.values())
    return {
        "depth": statuses["queued"],
        "statuses": statuses,
        "unknown_statuses": unknown,
        "unknown_rows": [
            {"id": scan_id, "status": status}
            for scan_id, status in (
                store.rows_with_unknown_status(UNKNOWN_SAMPLE) if unknown else []
            )
        ],
    }


@click.command("queue")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def queue_command(as_json: bool) -> None:
    """Show the queue: scans per status, including statuses scanqueue does not know."""
    snapshot = queue_snapshot(Settings.from_env())
    if as_json:
        click.echo(json.dumps(snapshot))
        return
    statuses: dict[str, int] = snapshot["statuses"]
    width = max(len(s) for s in statuses)
    click.echo(f"{'STATUS'.ljust(width)}  SCANS")
    for status, n in statuses.items():
        click.echo(f"{status.ljust(width)}  {n}")
    unknown: dict[str, int] = snapshot["unknown_statuses"]
    if unknown:
        listed = ", ".join(f"{status!r}: {n}" for status, n in unknown.items())
        click.echo(
            f"warning: {sum(unknown.values())} scan(s) with a status scanqueue does not know"
            f" ({listed}); nothing will run them",
            err=True,
        )
