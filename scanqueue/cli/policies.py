"""``scanqueue pause|resume [KEY]`` and ``scanqueue limits set|list|clear``
(docs/reference.md#policies).

Pauses and limits live in the database (``scanqueue_pauses``,
``scanqueue_limits``), so they hold across restarts and for every bridge: from
the moment ``pause`` returns, no bridge claims the key's scans (the claim reads
them inside its serialized transaction); scans already running go on.
"""

from __future__ import annotations

import json

import click

from scanqueue.config import Settings
from scanqueue.db.keys import MAX_KEY_CHARS
from scanqueue.db.policies import MAX_LIMIT
from scanqueue.db.rows import iso
from scanqueue.db.schema import PAUSE_ALL
from scanqueue.db.store import Store, store_for
from scanqueue.errors import ScanqueueError


class PolicyError(ScanqueueError):
    """A key or limit that cannot be used (one line, exit 1)."""


def _store() -> Store:
    return store_for(Settings.from_env().database_url)


def check_key(key: str | None) -> str:
    """A KEY argument, or the whole queue (:data:`PAUSE_ALL`) when omitted."""
    if key is None:
        return PAUSE_ALL
    cleaned = key.strip()
    if not cleaned or len(cleaned) > MAX_KEY_CHARS or not cleaned.isprintable():
        raise PolicyError(f"key must be 1 to {MAX_KEY_CHARS} printable characters")
    if cleaned == PAUSE_ALL:
        raise PolicyError(f"{PAUSE_ALL!r} is not a key: omit KEY for the whole queue")
    return cleaned


def _what(key: str) -> str:
    return "the whole queue" if key == PAUSE_ALL else f"key {key!r}"


@click.command("pause")
@click.argument("key", required=False)
def pause_command(key: str | None) -> None:
    """Pause KEY's queued scans (no KEY: the whole queue); running ones go on."""
    target = check_key(key)
    changed = _store().pause(target)
    click.echo(f"paused {_what(target)}" + ("" if changed else " (it was paused already)"))


@click.command("resume")
@click.argument("key", required=False)
def resume_command(key: str | None) -> None:
    """Resume KEY (no KEY: the whole queue)."""
    target = check_key(key)
    changed = _store().resume(target)
    click.echo(f"resumed {_what(target)}" + ("" if changed else " (it was not paused)"))


@click.group("limits")
def limits_group() -> None:
    """Per-key concurrency: at most N scans of a key running at once."""


@limits_group.command("set")
@click.argument("key")
@click.argument("max_running", type=click.IntRange(0, MAX_LIMIT))
def limits_set(key: str, max_running: int) -> None:
    """At most MAX_RUNNING scans of KEY running at once (0: no limit for KEY)."""
    target = check_key(key)
    _store().set_limit(target, max_running)
    click.echo(f"limit of key {target!r}: {max_running or 'none'}")


@limits_group.command("clear")
@click.argument("key")
def limits_clear(key: str) -> None:
    """Drop KEY's limit (SCANQUEUE_MAX_RUNNING_PER_KEY applies again); none set: exit 1."""
    target = check_key(key)
    _store().clear_limit(target)
    click.echo(f"limit of key {target!r} cleared")


@limits_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def limits_list(as_json: bool) -> None:
    """The per-key limits set (the default is SCANQUEUE_MAX_RUNNING_PER_KEY)."""
    settings = Settings.from_env()
    rows = store_for(settings.database_url).limits()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "key": r["key"],
                        "max_running": r["max_running"],
                        "updated_at": iso(r["updated_at"]),
                    }
                    for r in rows
                ]
            )
        )
        return
    click.echo(f"default (SCANQUEUE_MAX_RUNNING_PER_KEY): {settings.max_running_per_key or 'none'}")
    if rows:
        width = max(3, *(len(r["key"]) for r in rows))
        click.echo(f"{'KEY'.ljust(width)}  MAX_RUNNING")
        for r in rows:
            click.echo(f"{r['key'].ljust(width)}  {r['max_running'] or 'none'}")


def register(cli: click.Group) -> None:
    cli.add_command(pause_command)
    cli.add_command(resume_command)
    cli.add_command(limits_group)
