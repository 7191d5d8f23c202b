"""Provider kinds ("collectors") the real runner can run, and how they are found.

:mod:`.base` holds the plug-in protocol and the entry-point lookup;
:mod:`.sarif` turns SARIF 2.1.0 into findings; :mod:`.sarif_command` is the
built-in kind ``sarif-command`` that runs a scanner command and reads its SARIF.
"""

from __future__ import annotations

from scanqueue.runners.providers.base import (
    ENTRY_POINT_GROUP,
    Collector,
    Finding,
    ProviderConfigError,
    ProviderError,
    ProviderKind,
    available_kinds,
    build_collector,
    load_kind,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Collector",
    "Finding",
    "ProviderConfigError",
    "ProviderError",
    "ProviderKind",
    "available_kinds",
    "build_collector",
    "load_kind",
]
