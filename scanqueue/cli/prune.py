"""``scanqueue prune`` (docs/reference.md#retention): retention on demand.

The rules are the leader's (:mod:`scanqueue.db.retention`): finished scans
that finished more than ``--older-than`` days ago (default
``SCANQUEUE_RETAIN_DAYS``) go with their findings, events and webhook outbox
rows — never a queued or running scan, one of the last
``SCANQUEUE_RETAIN_PER_KEY`` completed scans of its key, or the baseline of a
scan that stays.  ``--dry-run`` judges and counts but writes nothing.  With
no ``--older-than`` and ``SCANQUEUE_RETAIN_DAYS`` 0 (keep for ever) there is
nothing to do: one line, exit 1.
"""

from __future__ import annotations

import json

import click

from scanqueue.config import Settings
from scanqueue.db.rows import iso
from scanqueue.db.store import store_for
from scanqueue.dispatch.retention import PrunePass
from scanqueue.errors import ScanqueueError


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="DAYS",
    help="Days since a scan finished (default: SCANQUEUE_RETAIN_DAYS).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def prune_command(dry_run: bool, older_than: float | None, as_json: bool) -> None:
    """Delete old finished scans with their findings and events (or count them)."""
    settings = Settings.from_env()
    days = older_than if older_than is not None else settings.retain_days
    if older_than is None and days <= 0:
        raise ScanqueueError(
            "nothing to prune: SCANQUEUE_RETAIN_DAYS is 0 (keep for ever); give --older-than DAYS"
        )
    run = PrunePass(
        store_for(settings.database_url),
        older_than_days=days,
        per_key=settings.retain_per_key,
        dry_run=dry_run,
    )
    run.run()
    counts = run.counts
    if as_json:
        click.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "older_than_days": days,
                    "cutoff": iso(run.cutoff),
                    "per_key": settings.retain_per_key,
                    **counts.to_json(),
                }
            )
        )
        return
    verb = "would prune" if dry_run else "pruned"
    click.echo(
        f"{verb} {counts.scans} scan(s), {counts.findings} finding(s), {counts.events} event(s)"
        f" and {counts.deliveries} webhook delivery(ies) of scans finished before"
        f" {iso(run.cutoff)}; kept {counts.kept} as one of the last {settings.retain_per_key}"
        " completed scans of their key or a baseline"
        + (
            f"; {counts.unkeyed} without a key yet are judged on a real run"
            if counts.unkeyed
            else ""
        )
    )
