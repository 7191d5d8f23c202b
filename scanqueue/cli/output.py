"""What the runner commands share: the runner store for this environment, and plain
text tables for people (``--json`` is for programs)."""

from __future__ import annotations

from collections.abc import Sequence

import click

from scanqueue.config import Settings
from scanqueue.db.store import store_for
from scanqueue.runners.store import RunnerStore


def runner_store() -> RunnerStore:
    return RunnerStore(store_for(Settings.from_env().database_url))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def one_line(text: str | None, limit: int = 80) -> str:
    """The first line of ``text``, cut to ``limit`` characters with an ellipsis."""
    first = text.strip().splitlines()[0] if text and text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"
