"""The one exception family scanqueue raises on purpose.

Every error a user can cause or meet (bad configuration, unreachable services,
unknown scans, malformed rows) is a :class:`ScanqueueError` whose ``str()`` is
the single line the CLI prints.  Driver errors are translated at the store
boundary, never deeper.
"""

from __future__ import annotations


class ScanqueueError(Exception):
    """Base of every error scanqueue raises on purpose; ``str()`` is one line."""


class ConfigError(ScanqueueError):
    """A configuration value is unusable; names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class UnavailableError(ScanqueueError):
    """A well-formed database or broker URL could not be reached."""


class NotFoundError(ScanqueueError):
    """No scan (or provider, check …) with that id."""


class ConflictError(ScanqueueError):
    """The request does not fit the row's current state (e.g. cancel a finished scan)."""


class MalformedRowError(ScanqueueError):
    """A row's stored data cannot be turned into a job."""
