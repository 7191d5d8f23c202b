"""Reading findings over time (docs/reference.md#findings-over-time): ``findings``, ``diff``, and
``status``'s detail view.

``scanqueue findings ID [--state S] [--json]`` lists what a scan found (with
``--state fixed``: the baseline's findings it no longer found);
``scanqueue diff ID [--json]`` prints the scan against its baseline;
:func:`print_scan_detail` is what ``scanqueue status ID`` shows without
``--json`` (counts, times and duration).  Unknown ids exit 1 through
:class:`~scanqueue.errors.NotFoundError`; nothing here reads a token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from scanqueue.cli.output import one_line, runner_store, table
from scanqueue.db.rows import ScanRow
from scanqueue.runners.diff import FINDING_STATES
from scanqueue.runners.diff_view import DiffView, read_diff
from scanqueue.runners.store import FindingRow


def _findings_table(rows: Sequence[FindingRow], with_state: bool = True) -> None:
    cells: list[Sequence[str]] = [
        (
            *((r.state or "",) if with_state else ()),
            r.severity or "",
            r.check_id,
            r.provider,
            r.location or r.resource or "",
            one_line(r.message),
        )
        for r in rows
    ]
    headers = ("SEVERITY", "CHECK", "PROVIDER", "LOCATION", "MESSAGE")
    table((("STATE",) if with_state else ()) + headers, cells)


@click.command("findings")
@click.argument("scan_id")
@click.option(
    "--state",
    type=click.Choice(FINDING_STATES),
    default=None,
    help="Only findings in this state against the baseline (fixed: the baseline's"
    " findings this scan no longer found).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def findings_command(scan_id: str, state: str | None, as_json: bool) -> None:
    """Show the findings of scan SCAN_ID (an unknown id exits 1)."""
    rs = runner_store()
    rs.store.get(scan_id)  # NotFoundError for an unknown id
    rows = rs.list_findings(scan_id, state)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
    elif rows:
        _findings_table(rows)


@click.command("diff")
@click.argument("scan_id")
@click.option("--json", "as_json", is_flag=True, help="Print the diff as one JSON object.")
def diff_command(scan_id: str, as_json: bool) -> None:
    """Show scan SCAN_ID against its baseline: new, fixed, reopened, unchanged.

    The baseline is the latest completed scan of the same key that finished
    before SCAN_ID started.  A scan whose diff is not computed yet (it has not
    completed) exits 1.
    """
    view = read_diff(runner_store(), scan_id)
    if as_json:
        click.echo(json.dumps(view.to_json()))
        return
    _print_diff(view)


def _print_diff(view: DiffView) -> None:
    baseline = view.baseline_id or "none (every finding is new)"
    click.echo(f"scan {view.scan_id} against baseline {baseline}")
    click.echo(
        f"new {len(view.new)}  reopened {len(view.reopened)}  fixed {len(view.fixed)}"
        f"  unchanged {view.unchanged}"
    )
    for title, rows in (("new", view.new), ("reopened", view.reopened), ("fixed", view.fixed)):
        if rows:
            click.echo("")
            click.echo(f"{title}:")
            _findings_table(rows, with_state=False)


def _when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value else "-"


def _duration(row: ScanRow) -> str:
    if row.started_at is None:
        return "-"
    if row.finished_at is None:
        return "(running)" if row.status == "running" else "-"
    seconds = (row.finished_at - row.started_at).total_seconds()
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:04.1f}s" if minutes else f"{secs:.1f}s"


def _join(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def print_scan_detail(row: ScanRow) -> None:
    """One scan for a person: status, what it scanned, findings and their change, times."""
    if row.findings_new is None:
        change = "not computed" if row.status != "completed" else "-"
    else:
        baseline = row.baseline_id or "none"
        change = f"{row.findings_new} new, {row.findings_fixed} fixed (baseline {baseline})"
    lines = [
        ("id", row.id),
        ("status", row.status),
        ("providers", _join(row.providers_scanned)),
        ("frameworks", _join(row.frameworks_scanned)),
        ("user", row.triggered_by_user or "-"),
        ("attempts", str(row.attempts)),
        ("findings", str(row.findings_count)),
        ("change", change),
        ("created", _when(row.created_at)),
        ("started", _when(row.started_at)),
        ("finished", _when(row.finished_at)),
        ("duration", _duration(row)),
    ]
    if row.error:
        lines.append(("error", one_line(row.error, 200)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key.ljust(width)}  {value}")
