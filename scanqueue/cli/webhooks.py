"""``scanqueue webhooks …`` (docs/reference.md#webhooks): receivers of finished scans,
signed and retried.

``add`` validates with :func:`scanqueue.db.webhook_spec.validate_webhook` — the
API's validator — so both refuse the same definitions in the same words.  The
secret comes from exactly one of ``--secret`` (visible in ``ps`` and shell
history, as the contract allows), ``--secret-file PATH`` (``-``: stdin) or
``--secret-env VAR``; none or two is a usage error (exit 2).  A bad URL,
``--on`` value or secret, a URL that exists, or an unknown one to remove: one
line, exit 1.  Secrets are never printed; a URL's password is masked.
"""

from __future__ import annotations

import json
import os

import click

from scanqueue.config import Settings
from scanqueue.db.rows import iso
from scanqueue.db.store import Store, store_for
from scanqueue.db.webhook_spec import DEFAULT_EVENTS, InvalidWebhook, WebhookRow, validate_webhook
from scanqueue.errors import ScanqueueError


def _store() -> Store:
    return store_for(Settings.from_env().database_url)


def _read_secret(secret: str | None, secret_file: str | None, secret_env: str | None) -> str:
    given = [s for s in (secret, secret_file, secret_env) if s is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --secret, --secret-file and --secret-env")
    if secret is not None:
        return secret
    if secret_env is not None:
        value = os.environ.get(secret_env)
        if not value:
            raise ScanqueueError(f"--secret-env: variable {secret_env} is not set or empty")
        return value
    assert secret_file is not None
    try:
        with click.open_file(secret_file, "r", encoding="utf-8") as handle:
            value = str(handle.read())
    except OSError as exc:
        raise ScanqueueError(f"--secret-file: cannot read {secret_file}: {exc.strerror}") from None
    value = value.rstrip("\r\n")
    if not value:
        raise ScanqueueError(f"--secret-file: {secret_file} is empty")
    return value


def _print(rows: list[WebhookRow], as_json: bool, one: bool = False) -> None:
    if as_json:
        out = [r.to_json() for r in rows]
        click.echo(json.dumps(out[0] if one else out))
        return
    if not rows:
        return
    headers = ("ID", "URL", "ON", "ONLY NEW", "PENDING", "DELIVERED", "GIVEN UP", "CREATED")
    table = []
    for r in rows:
        j = r.to_json()
        table.append(
            (
                str(r.id),
                j["url"],
                ",".join(r.events),
                "yes" if r.only_new_findings else "no",
                str(r.pending),
                str(r.delivered),
                str(r.given_up),
                iso(r.created_at) or "",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    for line in (headers, *table):
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


@click.group("webhooks")
def webhooks_group() -> None:
    """Receivers of finished scans: signed JSON POSTs from a durable outbox."""


@webhooks_group.command("add")
@click.argument("url")
@click.option("--secret", default=None, help="HMAC secret (visible in ps and shell history).")
@click.option("--secret-file", default=None, help="Read the secret from a file ('-': stdin).")
@click.option("--secret-env", default=None, metavar="VAR", help="Read the secret from $VAR.")
@click.option(
    "--on",
    "events",
    default=",".join(DEFAULT_EVENTS),
    show_default=True,
    help="Statuses to send, comma-separated.",
)
@click.option("--only-new-findings", is_flag=True, help="Only scans with new findings.")
@click.option("--json", "as_json", is_flag=True, help="Print the webhook as JSON.")
def add_command(
    url: str,
    secret: str | None,
    secret_file: str | None,
    secret_env: str | None,
    events: str,
    only_new_findings: bool,
    as_json: bool,
) -> None:
    """Send each matching finished scan to URL (http or https), signed with the secret."""
    value = _read_secret(secret, secret_file, secret_env)
    try:
        spec = validate_webhook(
            {
                "url": url,
                "secret": value,
                "events": events,
                "only_new_findings": only_new_findings,
            }
        )
    except InvalidWebhook as exc:
        hints = {"url": "URL", "secret": "secret", "events": "--on"}
        first = exc.details[0]
        raise ScanqueueError(
            f"{hints.get(first['field'], first['field'])}: {first['message']}"
        ) from None
    _print([_store().add_webhook(spec)], as_json, one=True)


@webhooks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_command(as_json: bool) -> None:
    """List webhooks and their deliveries (never their secrets)."""
    _print(_store().list_webhooks(), as_json)


@webhooks_group.command("remove")
@click.argument("url")
def remove_command(url: str) -> None:
    """Remove the webhook for URL, with its pending deliveries."""
    _store().remove_webhook(url=url)
