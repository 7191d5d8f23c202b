"""A scan's key: what per-key limits, dedup, pauses and findings diffs group by.

The row's ``scan_key`` when it has one; otherwise the sorted providers joined by
``,``, a ``|``, and the sorted frameworks joined by ``,`` (``aws,gcp|soc2``), as
docs/reference.md describes.  Whoever inserts through scanqueue stores it in
``effective_key`` at once; for rows other programs insert, the bridge derives it
when it first sees them.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_KEY_CHARS = 400


def derive_key(providers: Iterable[str], frameworks: Iterable[str]) -> str:
    """The key of a scan that names no ``scan_key``."""
    return ",".join(sorted(providers)) + "|" + ",".join(sorted(frameworks))


def effective_key(scan_key: str | None, providers: Iterable[str], frameworks: Iterable[str]) -> str:
    """``scan_key`` when set (and not blank), else :func:`derive_key`."""
    if scan_key is not None and scan_key.strip():
        return scan_key.strip()
    return derive_key(providers, frameworks)
