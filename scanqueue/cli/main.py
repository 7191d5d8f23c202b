"""The ``scanqueue`` command (docs/reference.md#commands).

Exit codes: 0 success; 1 a handled error, printed as exactly one line on
stderr; 2 usage error (click's own).  ``--json`` prints scans as objects whose
keys are the contract's column names, never the token.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import exc as sa_exc

from scanqueue.config import Settings, mask_url, warn_unknown_variables
from scanqueue.db.engine import describe_db_error
from scanqueue.db.rows import ScanRow
from scanqueue.db.schema import STATUSES
from scanqueue.db.store import Store, store_for
from scanqueue.errors import ScanqueueError

F = TypeVar("F", bound=Callable[..., Any])


class ScanqueueGroup(click.Group):
    """Turns every expected error into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ScanqueueError as exc:
            _fail(str(exc))
        except sa_exc.SQLAlchemyError as exc:
            _fail(_describe_sql_error(exc))
        except AlembicCommandError as exc:  # e.g. a revision the migrations do not know
            _fail(f"migration: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")


class CliError(ScanqueueError):
    """A command-line value that parses but cannot be used; one line, exit 1."""


def _fail(message: str) -> None:
    click.echo(f"scanqueue: {message}", err=True)
    sys.exit(1)


def _describe_sql_error(exc: sa_exc.SQLAlchemyError) -> str:
    text = describe_db_error(exc)
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"database is not set up ({text}): run `scanqueue db upgrade`"
    return f"database error: {text}"


def _settings() -> Settings:
    return Settings.from_env()


def _store(settings: Settings) -> Store:
    return store_for(settings.database_url)


@click.group(cls=ScanqueueGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
def cli(verbose: bool) -> None:
    """Run compliance scans from the `scans` table on Celery workers."""
    warn_unknown_variables()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- schema ---------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema."""


def _known_revisions() -> list[str]:
    """Revision ids of the migrations, oldest first."""
    from alembic.script import ScriptDirectory

    from scanqueue.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _explicit_revision(revision: str, *, allow: tuple[str, ...]) -> str:
    """``revision`` if it names a migration (or one of ``allow``); one line otherwise.

    Relative targets (``-1``, ``+2``, ``head-1``, ``0003@-1``) are refused: a
    typo'd or misremembered step count must not decide how much schema goes.
    """
    known = _known_revisions()
    if revision in known or revision in allow:
        return revision
    choices = ", ".join([*allow, *known])
    if any(c in revision for c in "+-@"):
        raise CliError(
            f"give an explicit revision, not {revision!r} (relative steps are not accepted):"
            f" one of {choices}"
        )
    raise CliError(f"unknown revision {revision!r}: expected one of {choices}")


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema (idempotent; safe on every deploy)."""
    from scanqueue.db.migrate import upgrade

    revision = _explicit_revision(revision, allow=("head",))
    settings = _settings()
    before, after = upgrade(_store(settings), revision)
    where = mask_url(settings.database_url)
    if before == after:
        click.echo(f"schema of {where} is up to date ({after})")
    else:
        click.echo(f"schema of {where} upgraded from {before or 'nothing'} to {after}")


@db.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Really drop what the later migrations added.")
def db_downgrade(revision: str, yes: bool) -> None:
    """Step the schema back to REVISION (a revision id, or `base`), for a rollback.

    Destructive (scanqueue's own tables and columns added after REVISION go, with
    their data), so it wants --yes.  Keeps the shared `scans` table and its rows.
    """
    from scanqueue.db.migrate import current_revision, downgrade

    revision = _explicit_revision(revision, allow=("base",))
    settings = _settings()
    store = _store(settings)
    current = current_revision(store)
    known = _known_revisions()
    target_index = -1 if revision == "base" else known.index(revision)
    current_index = known.index(current) if current in known else -1
    if current is None or target_index >= current_index:
        click.echo(
            f"schema of {mask_url(settings.database_url)} is at {current or 'nothing'}: "
            f"nothing to downgrade to {revision}"
        )
        return
    if not yes:
        dropped = ", ".join(known[target_index + 1 : current_index + 1])
        raise CliError(
            f"downgrading from {current} to {revision} undoes {dropped} and drops their"
            " tables and columns with their data: add --yes to do it"
        )
    before, after = downgrade(store, revision)
    click.echo(
        f"schema of {mask_url(settings.database_url)} downgraded from {before} to {after or 'base'}"
    )


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the newest one this version knows."""
    from scanqueue.db.migrate import current_revision, head_revision

    click.echo(f"current {current_revision(_store(_settings())) or 'none'}, head {head_revision()}")


# -- scans ----------------------------------------------------------------------------


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def _print_scan(row: ScanRow, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(row.to_json()))
    else:
        _print_table([row])


def _print_table(rows: Sequence[ScanRow]) -> None:
    headers = ("ID", "STATUS", "ATTEMPTS", "PRIO", "KEY", "LABELS", "CREATED", "ERROR")
    table = [
        (
            r.id,
            r.status,
            str(r.attempts),
            str(r.priority),
            r.key or f"{_join(r.providers_scanned)}|{_join(r.frameworks_scanned)}",
            _labels_text(r.labels),
            r.created_at.strftime("%Y-%m-%d %H:%M:%S") if r.created_at else "",
            (r.error or "").splitlines()[0][:60] if r.error else "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    for line in (headers, *table):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _labels_text(labels: Any) -> str:
    if isinstance(labels, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return ""


def _join(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


@cli.command()
@click.option("--provider", "providers", multiple=True, required=True, help="Provider to scan.")
@click.option("--framework", "frameworks", multiple=True, help="Framework to check against.")
@click.option("--user", default=None, help="Who triggered the scan.")
@click.option("--priority", type=int, default=None, help="Higher runs first (default 0).")
@click.option("--key", default=None, help="The key limits, dedup and pauses group by.")
@click.option("--run-after", default=None, help="ISO-8601 time; not started before (naive: UTC).")
@click.option("--timeout", "timeout_seconds", type=int, default=None, help="Seconds a run may run.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--unique", is_flag=True, help="Return the key's queued scan instead of adding one.")
@_json_option
def enqueue(
    providers: tuple[str, ...],
    frameworks: tuple[str, ...],
    user: str | None,
    priority: int | None,
    key: str | None,
    run_after: str | None,
    timeout_seconds: int | None,
    labels: tuple[str, ...],
    unique: bool,
    as_json: bool,
) -> None:
    """Insert a queued scan and print its id (with --unique: maybe an existing one's)."""
    from scanqueue.db.scan_request import (
        InvalidScanRequest,
        parse_label_filter,
        validate_scan_request,
    )

    hints = {
        "providers": "--provider",
        "frameworks": "--framework",
        "user": "--user",
        "priority": "--priority",
        "key": "--key",
        "run_after": "--run-after",
        "timeout_seconds": "--timeout",
        "labels": "--label",
    }
    try:
        label_details: list[dict[str, str]] = []
        label_map = parse_label_filter(labels, "=", label_details, "labels")
        if label_details:
            raise InvalidScanRequest(label_details)
        # The API's validator, so both refuse the same values for the same reasons.
        scan = validate_scan_request(
            {
                "providers": list(providers),
                "frameworks": list(frameworks),
                "user": user,
                "priority": priority,
                "key": key,
                "run_after": run_after,
                "timeout_seconds": timeout_seconds,
                "labels": label_map if labels else None,
                "unique": unique,
            }
        )
    except InvalidScanRequest as exc:
        first = exc.details[0]["field"].split("[", 1)[0]
        raise click.BadParameter(str(exc), param_hint=hints.get(first, first)) from None
    row, deduplicated = _store(_settings()).enqueue_request(scan)
    if as_json:
        shown = row.to_json()
        if scan.unique:  # asked for dedup: say whether it happened
            shown["deduplicated"] = deduplicated
        click.echo(json.dumps(shown))
    else:
        click.echo(row.id)


@cli.command()
@click.argument("scan_id")
@_json_option
def status(scan_id: str, as_json: bool) -> None:
    """Show one scan: its findings and their change against the baseline, times, duration."""
    row = _store(_settings()).get(scan_id)
    if as_json:
        _print_scan(row, as_json)
        return
    from scanqueue.cli.findings import print_scan_detail

    print_scan_detail(row)


@cli.command("list")
@click.option("--status", "status_filter", type=click.Choice(STATUSES), default=None)
@click.option("--key", default=None, help="Only scans of this (effective) key.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE; repeatable, all must match.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@_json_option
def list_scans(
    status_filter: str | None,
    key: str | None,
    labels: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> None:
    """List the newest scans, newest first."""
    from scanqueue.db.scan_request import parse_label_filter

    details: list[dict[str, str]] = []
    wanted = parse_label_filter(labels, "=", details, "--label")
    if details:
        raise click.BadParameter(details[0]["message"], param_hint="--label")
    rows = _store(_settings()).list_scans(
        status=status_filter, limit=limit, key=key, labels=wanted or None
    )
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
    elif rows:
        _print_table(rows)


@cli.command()
@click.argument("scan_id")
@_json_option
def cancel(scan_id: str, as_json: bool) -> None:
    """Cancel a queued or running scan (a finished one exits 1, unchanged)."""
    settings = _settings()
    row = _store(settings).cancel(scan_id)
    _emit_canceled(settings, row)
    _print_scan(row, as_json)


def _emit_canceled(settings: Settings, row: ScanRow) -> None:
    from scanqueue.observe.event_sender import emit_standalone

    emit_standalone(settings, "scan.canceled", row.id, {"reason": row.error})


# -- long-running processes -------------------------------------------------------------


def _wait_for_signal() -> None:
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)
    while not stop.wait(3600):
        pass


def _setup_process_logging(settings: Settings) -> None:
    from scanqueue.observe.logs import configure_logging

    configure_logging(settings.log_format)


@cli.command()
def bridge() -> None:
    """Run the bridge alone (watch `scans`, dispatch to the broker, reap orphans)."""
    settings = _settings()
    _setup_process_logging(settings)
    store = _store(settings)
    from scanqueue.dispatch.service import build_bridge_service
    from scanqueue.worker.app import app
    from scanqueue.worker.runtime import wait_for_services

    # Bounded start (SCANQUEUE_CONNECT_TIMEOUT): the database, Redis and the broker.
    wait_for_services(settings, app)

    service = build_bridge_service(settings, app)
    _start_metrics_server(settings)
    service.start()
    logging.getLogger("scanqueue.dispatch.bridge").info(
        "bridge running (%s) on %s", service.leadership.identity, store.masked_url
    )
    try:
        _wait_for_signal()
    finally:
        service.stop()


def _start_metrics_server(settings: Settings) -> None:
    if not settings.metrics_port:
        return
    from scanqueue.observe.metrics import serve_metrics

    serve_metrics(settings.metrics_port)


def _register_commands() -> None:
    """Commands that live beside what they drive: serve (web) and the real runner's."""
    from scanqueue.api.serve import serve_command
    from scanqueue.cli.policies import register as register_policies
    from scanqueue.cli.prune import prune_command
    from scanqueue.cli.queue import queue_command
    from scanqueue.cli.runners import register
    from scanqueue.cli.schedules import schedules_group
    from scanqueue.cli.webhooks import webhooks_group

    cli.add_command(serve_command)
    cli.add_command(queue_command)
    cli.add_command(schedules_group)
    cli.add_command(webhooks_group)
    cli.add_command(prune_command)
    register_policies(cli)
    register(cli)


_register_commands()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="scanqueue")
    except ScanqueueError as exc:  # raised while building settings before a command ran
        _fail(str(exc))
