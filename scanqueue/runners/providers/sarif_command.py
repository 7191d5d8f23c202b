"""The built-in provider kind ``sarif-command``: run a scanner, read the SARIF it prints.

Config (the provider row's JSON)::

    {"command": ["ruff", "check", "--output-format", "sarif", "--exit-zero", "."],
     "cwd": "/srv/checkout",          # optional; default: the worker's directory
     "timeout": 600,                  # optional seconds; default 600
     "env": {"NAME": "value",         # optional; added to the minimal environment
             "TOKEN": {"from_env": "SCANNER_TOKEN"}},  # read from the worker's environment
     "max_output_bytes": 268435456}   # optional; default 256 MiB

The command is an argument list, never a shell line.  It runs in a session
(and so a process group) of its own, with stdin closed and a minimal
environment: ``PATH``, ``HOME``, locale, ``TZ``, temporary directory, CA
certificates and proxies from the worker (:data:`PASSED_NAMES`), never its
URLs or secrets, then the config's ``env``.  A secret the scanner needs is
given as ``{"from_env": "VARIABLE"}`` so it stays out of the ``providers``
table (and ``providers list`` shows literal values as ``***``).  Its
stdout is pumped into a temporary file as it comes (never held in memory) and
capped at ``max_output_bytes``; stderr keeps only its tail, for error
messages.  A timeout, a cancel or an oversized output kills the whole process
group; so does the leader's exit, so nothing it left behind keeps running.  On
Linux the kernel also kills the command if the process that started it dies
(``PR_SET_PDEATHSIG``): a pool process killed with SIGKILL, by the OOM killer
or by scanqueue's own overdue-run fence, does not leave its scanner running
beside the next attempt.  Processes the command started itself are not
covered by that signal.

A non-zero exit with valid SARIF is a scanner that found problems: its
results count.  Every failure raises :class:`ProviderError` naming the provider.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from scanqueue.runners.api import ScanContext
from scanqueue.runners.providers.base import Finding, ProviderConfigError, ProviderError
from scanqueue.runners.providers.sarif import SarifError, iter_findings

log = logging.getLogger(__name__)

KIND = "sarif-command"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_OUTPUT_BYTES = 256 * 1024 * 1024
POLL_INTERVAL_S = 0.1
PIPE_READ_BYTES = 1 << 16
STDERR_TAIL_BYTES = 4096
CONFIG_KEYS = frozenset({"command", "cwd", "timeout", "env", "max_output_bytes"})

# Never handed to a scanner: scanqueue's own connection strings and settings,
# and anything whose name says it is a secret.
SCRUBBED_NAMES = frozenset(
    {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "PGPASSFILE"}
)
SCRUBBED_PREFIXES = ("SCANQUEUE_", "CELERY_", "FLOWER_", "OPENLINEAGE")
SECRET_MARKERS = (
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "CREDENTIAL",
    "API_KEY",
    "APIKEY",
    "PRIVATE_KEY",
)
_URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]*:[^/\s@]+@")


# The only variables a scanner gets from the worker's environment (then its
# config's ``env`` on top): what a program needs to find its tools, locale, time
# zone, temporary directory and CA certificates.  An allow-list, not a deny-list:
# a worker's environment is full of secrets scanqueue cannot recognise by name.
PASSED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
PASSED_PREFIXES = ("LC_",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def scrubbed_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a scanner gets: :data:`PASSED_NAMES` and ``LC_*`` only,
    and of those never one that looks like a secret (a proxy URL with a password)."""
    clean: dict[str, str] = {}
    for name, value in environ.items():
        upper = name.upper()
        if name not in PASSED_NAMES and not name.startswith(PASSED_PREFIXES):
            continue
        if upper in SCRUBBED_NAMES or upper.startswith(SCRUBBED_PREFIXES):
            continue
        if any(marker in upper for marker in SECRET_MARKERS):
            continue
        if _URL_WITH_PASSWORD.search(value):
            continue
        clean[name] = value
    return clean


ENV_SHAPE = (
    'config.env must be an object whose values are strings or {"from_env": "VARIABLE"} '
    "(read from the worker's environment when the scanner starts)"
)


def resolve_env(
    name: str, env: Mapping[str, str | Mapping[str, str]], environ: Mapping[str, str]
) -> dict[str, str]:
    """The config's ``env`` with each ``{"from_env": "X"}`` replaced by the worker's ``$X``.

    So a secret a scanner needs (an API token) lives in the worker's environment
    or secret store, never in the ``providers`` table or on a command line.
    """
    out: dict[str, str] = {}
    for key, value in env.items():
        if isinstance(value, str):
            out[key] = value
            continue
        source = value["from_env"]
        if source not in environ:
            raise ProviderError(
                f"provider {name!r}: config.env.{key} reads ${source}, which is not set in the"
                " worker's environment"
            )
        out[key] = environ[source]
    return out


@dataclass(frozen=True)
class SarifCommandConfig:
    """A validated ``sarif-command`` config."""

    command: tuple[str, ...]
    cwd: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    env: Mapping[str, str | Mapping[str, str]] = field(default_factory=dict)
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES

    @classmethod
    def parse(cls, name: str, config: Mapping[str, Any]) -> SarifCommandConfig:
        def bad(problem: str) -> ProviderConfigError:
            return ProviderConfigError(f"provider {name!r} ({KIND}): {problem}")

        if not isinstance(config, Mapping):
            raise bad("config must be a JSON object")
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise bad(f"unknown config key(s) {', '.join(unknown)}")
        command = config.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) for a in command)
            or not command[0]
        ):
            raise bad("config.command must be a non-empty array of strings")
        cwd = config.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd):
            raise bad("config.cwd must be a non-empty string")
        timeout = config.get("timeout", DEFAULT_TIMEOUT_S)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise bad("config.timeout must be a positive number of seconds")
        env = config.get("env", {})
        if not isinstance(env, Mapping):
            raise bad(ENV_SHAPE)
        for key, value in env.items():
            if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
                raise bad(f"config.env: {key!r} is not a variable name")
            if isinstance(value, str):
                continue
            ref = value.get("from_env") if isinstance(value, Mapping) else None
            if (
                not isinstance(value, Mapping)
                or set(value) != {"from_env"}
                or not isinstance(ref, str)
                or not _ENV_NAME.fullmatch(ref)
            ):
                raise bad(f"config.env.{key}: {ENV_SHAPE}")
        limit = config.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise bad("config.max_output_bytes must be a positive integer")
        return cls(tuple(command), cwd, float(timeout), dict(env), limit)


class SarifCommandProvider:
    """A provider of kind ``sarif-command``; built as ``SarifCommandProvider(name, config)``."""

    kind = KIND

    def __init__(self, name: str, config: Mapping[str, Any]) -> None:
        self.name = name
        self.config = SarifCommandConfig.parse(name, config)

    def __repr__(self) -> str:
        return f"SarifCommandProvider({self.name!r})"

    def collect(self, ctx: ScanContext) -> Iterator[Finding]:
        """Run the command, then yield its findings; nothing if the scan was cancelled."""
        with tempfile.TemporaryFile("w+b") as stdout:
            outcome = _CommandRun(self.name, self.config, stdout).run(ctx)
            if outcome is None:
                return
            stdout.seek(0, os.SEEK_END)
            if stdout.tell() == 0:
                raise ProviderError(
                    f"provider {self.name!r}: {outcome.describe_exit()} and printed no SARIF"
                    f"{outcome.stderr_hint()}"
                )
            stdout.seek(0)
            text = io.TextIOWrapper(stdout, encoding="utf-8", errors="strict")
            try:
                yield from iter_findings(
                    text, base_dir=self._base_dir(), stop=lambda: ctx.cancelled
                )
            except (SarifError, UnicodeDecodeError) as exc:
                raise ProviderError(
                    f"provider {self.name!r}: invalid SARIF output ({outcome.describe_exit()}): "
                    f"{exc}{outcome.stderr_hint()}"
                ) from None
            finally:
                text.detach()

    def _base_dir(self) -> str:
        return self.config.cwd if self.config.cwd is not None else os.getcwd()


@dataclass(frozen=True)
class _Exited:
    returncode: int
    stderr_tail: bytes

    def describe_exit(self) -> str:
        return f"command exited with code {self.returncode}"

    def stderr_hint(self) -> str:
        lines = self.stderr_tail.decode("utf-8", "replace").strip().splitlines()
        return f"; stderr: {lines[-1][:300]}" if lines else ""


class _CommandRun:
    """One run of the command: start, pump, watch the clock and the cancel flag, reap."""

    def __init__(self, name: str, config: SarifCommandConfig, stdout: IO[bytes]) -> None:
        self.name = name
        self.config = config
        self.stdout = stdout
        self.written = 0
        self.stderr_tail = bytearray()

    def run(self, ctx: ScanContext) -> _Exited | None:
        config = self.config
        if config.cwd is not None and not os.path.isdir(config.cwd):
            raise ProviderError(
                f"provider {self.name!r}: working directory {config.cwd!r} does not exist"
            )
        env = scrubbed_environ(os.environ)
        env.update(resolve_env(self.name, config.env, os.environ))
        try:
            proc = subprocess.Popen(
                list(config.command),
                cwd=config.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with(os.getpid()),
            )
        except OSError as exc:
            raise ProviderError(
                f"provider {self.name!r}: cannot run {config.command[0]!r}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        log.info("provider %s: started %s (pid %d)", self.name, config.command[0], proc.pid)
        try:
            return self._supervise(proc, ctx)
        finally:
            # Whatever happened (including an exception or a closed generator), the
            # command's whole process group ends here and the leader is reaped.
            _kill_group(proc)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()

    def _supervise(self, proc: subprocess.Popen[bytes], ctx: ScanContext) -> _Exited | None:
        assert proc.stdout is not None and proc.stderr is not None
        deadline = time.monotonic() + self.config.timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            while True:
                if ctx.cancelled:
                    _kill_group(proc)
                    log.info("provider %s: killed the command, the scan was stopped", self.name)
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _kill_group(proc)
                    raise ProviderError(
                        f"provider {self.name!r}: command timed out after "
                        f"{self.config.timeout_s:g}s (killed with its child processes)"
                    )
                if not sel.get_map():
                    if _leader_exited(proc):
                        _kill_group(proc)  # anything it left running in the background
                        break
                    time.sleep(min(POLL_INTERVAL_S, remaining))
                    continue
                for key, _ in sel.select(timeout=min(POLL_INTERVAL_S, remaining)):
                    self._pump(sel, key)
                if _leader_exited(proc):
                    # Its output is complete; children it left behind would only hold
                    # the pipes open until the timeout.
                    _kill_group(proc)
        returncode = proc.wait()
        if returncode < 0:
            raise ProviderError(
                f"provider {self.name!r}: command was killed by {_signal_name(-returncode)}"
                f"{_Exited(returncode, bytes(self.stderr_tail)).stderr_hint()}"
            )
        return _Exited(returncode, bytes(self.stderr_tail))

    def _pump(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        fd = key.fd
        data = os.read(fd, PIPE_READ_BYTES)
        if not data:
            sel.unregister(key.fileobj)
            return
        if key.data == "err":
            self.stderr_tail += data
            del self.stderr_tail[:-STDERR_TAIL_BYTES]
            return
        self.written += len(data)
        if self.written > self.config.max_output_bytes:
            raise ProviderError(
                f"provider {self.name!r}: command printed more than "
                f"{self.config.max_output_bytes} bytes on stdout (max_output_bytes); killed it"
            )
        self.stdout.write(data)


_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()  # looked up once, not in the forked child


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the command when its starter dies.

    It runs in the child between fork and exec, with other threads of the pool
    process gone: it only calls the prebuilt ``prctl`` and ``getppid``, taking no
    lock.  The signal follows the thread that started the command, which in a
    pool process is the main thread that runs the scan.  If the starter died
    before the signal was armed, the child exits at once.
    """
    prctl = _prctl
    if prctl is None:
        return None
    kill = int(signal.SIGKILL)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return arm


def _leader_exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once the command itself has exited, without reaping it.

    Not reaping keeps its pid (and so its process group id) from being reused
    while the group may still be signalled.
    """
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is not None:
        return  # reaped: its pid may belong to someone else by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
