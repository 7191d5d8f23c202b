"""The provider-kind plug-in surface: Finding, Collector, ProviderKind and their discovery.

A *provider* is a row of the ``providers`` table (name, kind, JSON config).  Its
*kind* names a class (or any callable) registered under the entry-point group
``scanqueue.provider_kinds``; called as ``kind(name, config)`` it validates the
config (raising :class:`ProviderConfigError`) and returns a :class:`Collector`,
whose ``collect(ctx)`` yields :class:`Finding` objects.  Another package adds a
kind by declaring an entry point, without touching scanqueue::

    [project.entry-points."scanqueue.provider_kinds"]
    my-kind = "mypkg.collectors:MyKind"

This module owns that protocol and the lookup of kinds by name; it knows
nothing about any particular scanner or about the database.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from scanqueue.errors import ScanqueueError
from scanqueue.runners.api import ScanContext

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "scanqueue.provider_kinds"

# Found even when scanqueue runs from a source tree without installed metadata.
BUILTIN_KINDS: dict[str, str] = {
    "sarif-command": "scanqueue.runners.providers.sarif_command:SarifCommandProvider",
}

SEVERITIES = ("critical", "high", "medium", "low", "info")


class ProviderError(ScanqueueError):
    """A provider could not produce findings; the text names the provider."""


class ProviderConfigError(ProviderError):
    """A provider's kind or JSON config is unusable."""


@dataclass(frozen=True)
class Finding:
    """One problem a collector found, before it is tied to a scan and a provider."""

    check_id: str
    message: str | None = None
    severity: str | None = None
    resource: str | None = None
    location: str | None = None
    title: str | None = None
    status: str = "fail"
    frameworks: tuple[str, ...] = field(default=())
    # The scanner's own identity of the finding ("key=value", e.g. from SARIF
    # partialFingerprints); None: scanqueue hashes check, resource, location, message.
    fingerprint: str | None = None


@runtime_checkable
class Collector(Protocol):
    """Produces the findings of one provider for one scan.

    ``collect`` may be a generator; it should look at ``ctx.cancelled`` (or use
    ``ctx.wait``) while it works and stop promptly once it is set.  Raising
    fails the scan, so the exception's text should name the provider.
    """

    def collect(self, ctx: ScanContext) -> Iterable[Finding]: ...


class ProviderKind(Protocol):
    """Builds a collector from a provider row; raises ProviderConfigError on bad config."""

    def __call__(self, name: str, config: Mapping[str, Any]) -> Collector: ...


_kinds_lock = threading.Lock()
_kinds_cache: dict[str, ProviderKind] = {}


def available_kinds() -> list[str]:
    """Every kind name that :func:`load_kind` would find, sorted."""
    names = set(BUILTIN_KINDS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def load_kind(kind: str) -> ProviderKind:
    """The provider kind registered as ``kind``; ProviderConfigError if there is none."""
    with _kinds_lock:
        found = _kinds_cache.get(kind)
        if found is not None:
            return found
        target: Any
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
        try:
            if matches:
                target = matches[0].load()
            elif kind in BUILTIN_KINDS:
                module_name, _, attr = BUILTIN_KINDS[kind].partition(":")
                target = getattr(importlib.import_module(module_name), attr)
            else:
                raise ProviderConfigError(
                    f"unknown provider kind {kind!r} (available: {', '.join(available_kinds())})"
                )
        except ProviderConfigError:
            raise
        except Exception as exc:
            raise ProviderConfigError(
                f"provider kind {kind!r} cannot be loaded: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(target):
            raise ProviderConfigError(f"provider kind {kind!r} is not callable: {target!r}")
        _kinds_cache[kind] = target
        return target  # type: ignore[no-any-return]


SECRET_KEY_MARKERS = ("password", "passwd", "secret", "token", "credential", "api_key", "apikey")


def masked_config(config: Any) -> Any:
    """A provider's config for showing (CLI, API): secrets replaced by ``***``.

    Every literal value under ``env`` is masked (environment values are where
    scanners take their tokens), and so is any value whose key looks secret.
    ``{"from_env": "X"}`` references stay: they name a variable, not a secret.
    Anything that is not an object is returned as it is, so a malformed config
    shows as what it is.
    """
    if isinstance(config, list):
        return [masked_config(v) for v in config]
    if not isinstance(config, Mapping):
        return config
    shown: dict[str, Any] = {}
    for key, value in config.items():
        if _is_env_reference(value):
            shown[key] = value
        elif key == "env" and isinstance(value, Mapping):
            shown[key] = {k: v if _is_env_reference(v) else "***" for k, v in value.items()}
        elif key == "env" or any(m in str(key).lower() for m in SECRET_KEY_MARKERS):
            shown[key] = "***"
        else:
            shown[key] = masked_config(value)
    return shown


def _is_env_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"from_env"}


def build_collector(name: str, kind: str, config: Mapping[str, Any]) -> Collector:
    """Instantiate provider ``name``; every failure is a ProviderConfigError naming it."""
    try:
        factory = load_kind(kind)
    except ProviderConfigError as exc:
        raise ProviderConfigError(f"provider {name!r}: {exc}") from None
    try:
        collector = factory(name, config)
    except ProviderError:
        raise
    except Exception as exc:
        raise ProviderConfigError(
            f"provider {name!r} (kind {kind}) has an unusable config: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(getattr(collector, "collect", None)):
        raise ProviderConfigError(f"provider kind {kind!r} built no collector for {name!r}")
    return collector
