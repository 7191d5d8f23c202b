"""The real runner's commands (docs/reference.md#runner-api): ``providers`` and ``checks``.

:func:`register` adds them to the ``scanqueue`` group, with ``findings`` and
``diff`` from :mod:`scanqueue.cli.findings`.  Handled errors are
:class:`~scanqueue.errors.ScanqueueError` subclasses, which the group turns
into one line on stderr and exit 1.  Nothing here reads or prints a token.
"""

from __future__ import annotations

import json
from typing import Any

import click

from scanqueue.cli.findings import diff_command, findings_command
from scanqueue.cli.output import one_line, runner_store, table
from scanqueue.errors import ScanqueueError
from scanqueue.runners.providers.base import ProviderConfigError, build_collector, masked_config


class UsageProblemError(ScanqueueError):
    """An argument is well-formed for click but unusable (e.g. --config is not JSON)."""


def register(cli: click.Group) -> None:
    """Add ``providers``, ``checks``, ``findings`` and ``diff`` to the ``scanqueue`` command."""
    cli.add_command(providers_group)
    cli.add_command(checks_group)
    cli.add_command(findings_command)
    cli.add_command(diff_command)


# -- providers --------------------------------------------------------------------------


@click.group("providers")
def providers_group() -> None:
    """Targets the real runner scans (rows of `providers`)."""


@providers_group.command("add")
@click.argument("name")
@click.option("--kind", required=True, help="Provider kind, e.g. sarif-command.")
@click.option(
    "--config",
    "config_json",
    default=None,
    help='The kind\'s config as JSON. Secrets in "env" only as {"from_env": "VAR"}.',
)
@click.option(
    "--config-file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Read the config from this JSON file ('-': stdin); it may hold env values.",
)
@click.option("--disabled", is_flag=True, help="Add it disabled.")
@click.option("--json", "as_json", is_flag=True, help="Print the provider as JSON.")
def providers_add(
    name: str,
    kind: str,
    config_json: str | None,
    config_file: Any,
    disabled: bool,
    as_json: bool,
) -> None:
    """Register provider NAME (a name that exists exits 1).

    The config comes from --config (JSON on the command line) or --config-file.
    A command line shows in `ps` and in shell history, so there `env` values must
    be references to the worker's environment, {"from_env": "VAR"}; literal
    values (tokens) go in a file, or better in the worker's environment.
    """
    if not name.strip():
        raise UsageProblemError("provider name must not be empty")
    if (config_json is None) == (config_file is None):
        raise click.UsageError("give exactly one of --config JSON and --config-file PATH")
    source = "--config" if config_json is not None else "--config-file"
    text = config_json if config_json is not None else config_file.read()
    try:
        config = json.loads(text)
    except RecursionError:
        raise UsageProblemError(f"{source} is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise UsageProblemError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageProblemError(f"{source} must be a JSON object")
    if config_json is not None:
        literal = _literal_env_names(config)
        if literal:
            raise UsageProblemError(
                f"--config holds env value(s) for {', '.join(literal)} on the command line, "
                'where `ps` and shell history show them: use {"from_env": "VARIABLE"} '
                "or --config-file"
            )
    # Validates the kind and the config without running anything.
    try:
        build_collector(name, kind, config)
    except ProviderConfigError as exc:
        raise UsageProblemError(str(exc)) from None
    row = runner_store().add_provider(name, kind, config, enabled=not disabled)
    if as_json:
        click.echo(json.dumps(_shown(row.to_json())))
    else:
        click.echo(f"provider {row.name} added ({row.kind}{'' if row.enabled else ', disabled'})")


def _literal_env_names(config: dict[str, Any]) -> list[str]:
    env = config.get("env")
    if not isinstance(env, dict):
        return []
    return sorted(str(k) for k, v in env.items() if isinstance(v, str))


def _shown(provider: dict[str, Any]) -> dict[str, Any]:
    """A provider's JSON with its config's secrets masked (``env`` values and the like)."""
    return {**provider, "config": masked_config(provider.get("config"))}


@providers_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def providers_list(as_json: bool) -> None:
    """List providers (env values and other secrets in configs shown as ***)."""
    rows = runner_store().list_providers()
    if as_json:
        click.echo(json.dumps([_shown(r.to_json()) for r in rows]))
    elif rows:
        table(
            ("NAME", "KIND", "ENABLED", "CONFIG"),
            [
                (
                    r.name,
                    r.kind,
                    "yes" if r.enabled else "no",
                    one_line(json.dumps(masked_config(r.config))),
                )
                for r in rows
            ],
        )


@providers_group.command("remove")
@click.argument("name")
def providers_remove(name: str) -> None:
    """Remove provider NAME (an unknown name exits 1)."""
    runner_store().remove_provider(name)
    click.echo(f"provider {name} removed")


@providers_group.command("enable")
@click.argument("name")
def providers_enable(name: str) -> None:
    """Let scans use provider NAME again."""
    runner_store().set_provider_enabled(name, True)
    click.echo(f"provider {name} enabled")


@providers_group.command("disable")
@click.argument("name")
def providers_disable(name: str) -> None:
    """Make scans that name provider NAME fail instead of running it."""
    runner_store().set_provider_enabled(name, False)
    click.echo(f"provider {name} disabled")


# -- checks -----------------------------------------------------------------------------


@click.group("checks")
def checks_group() -> None:
    """Check states: a disabled check produces no findings (check ids are global)."""


@checks_group.command("disable")
@click.argument("check_id")
def checks_disable(check_id: str) -> None:
    """Disable CHECK_ID for every provider."""
    if not check_id.strip():
        raise UsageProblemError("check id must not be empty")
    runner_store().set_check(check_id, False)
    click.echo(f"check {check_id} disabled")


@checks_group.command("enable")
@click.argument("check_id")
def checks_enable(check_id: str) -> None:
    """Enable CHECK_ID again."""
    if not check_id.strip():
        raise UsageProblemError("check id must not be empty")
    runner_store().set_check(check_id, True)
    click.echo(f"check {check_id} enabled")


@checks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def checks_list(as_json: bool) -> None:
    """List checks with a recorded state."""
    rows = runner_store().list_checks()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
    elif rows:
        table(
            ("CHECK", "ENABLED", "UPDATED"),
            [
                (
                    r.check_id,
                    "yes" if r.enabled else "no",
                    r.updated_at.strftime("%Y-%m-%d %H:%M:%S") if r.updated_at else "",
                )
                for r in rows
            ],
        )
