"""``scanqueue serve``: where to listen, whether to, and uvicorn (docs/reference.md#commands).

The port is ``--port``, else ``$PORT`` (a platform's, then on 0.0.0.0), else
8000 on 127.0.0.1.  Secure by default: ``serve`` refuses to listen beyond
loopback without a token unless ``SCANQUEUE_API_INSECURE=true``
(:func:`check_exposure`).  It waits for the database, binds the socket itself
(a busy port is one line and exit 1), and ends open event streams on
SIGTERM/SIGINT so shutdown is prompt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

import click

from scanqueue.api.app import create_app
from scanqueue.api.guards import is_loopback_host
from scanqueue.api.state import AppState
from scanqueue.config import Settings
from scanqueue.db.store import store_for
from scanqueue.errors import ConfigError, ScanqueueError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
GRACEFUL_SHUTDOWN_S = 3


def _default_port() -> tuple[int, bool]:
    raw = os.environ.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT, False
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError("PORT", f"expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError("PORT", f"must be from 0 to 65535, got {port}")
    return port, True


@click.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Default: $PORT, 8000.")
@click.option(
    "--host", default=None, help="Default: 0.0.0.0 when $PORT is set (platforms), else 127.0.0.1."
)
def serve_command(port: int | None, host: str | None) -> None:
    """Serve the HTTP API, the event stream and the page."""
    import uvicorn

    from scanqueue.observe.logs import configure_logging

    settings = Settings.from_env()
    env_port, platform = _default_port()
    if port is None:
        port = env_port
    if host is None:
        # A platform that hands out $PORT routes to the container's interface.
        host = "0.0.0.0" if platform else "127.0.0.1"  # noqa: S104
    check_exposure(settings, host)
    configure_logging(settings.log_format)
    store = store_for(settings.database_url)
    # Containers often start before their database: retry (logged), then one line.
    store.wait_until_ready(settings.connect_timeout_s)
    # Bound here, before anything says "serving": a busy port is one line and exit 1,
    # not uvicorn's log and exit 3.
    sock = bind_socket(host, port)

    app = create_app(settings)
    state: AppState = app.state.scanqueue

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if sockets is not None and self.started:
                # uvicorn says "running on" only for sockets it bound itself.
                self._log_started_message(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Event streams never end by themselves: end them so shutdown is prompt.
            state.close_threadsafe()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers
    # that ends the process with status 0 instead of "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving on http://%s:%d (database %s)", shown, bound_port, store.masked_url)
    Server(config).run(sockets=[sock])


class ServeRefused(ScanqueueError):
    """``serve`` will not start as asked (exposed without a token, port taken)."""


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to listen beyond loopback without a token, unless told so on purpose."""
    if settings.api_token or settings.api_insecure or is_loopback_host(host):
        return
    raise ServeRefused(
        f"refusing to serve on {host} without SCANQUEUE_API_TOKEN: anyone who can reach it "
        "could enqueue and cancel scans; set SCANQUEUE_API_TOKEN (or "
        "SCANQUEUE_API_INSECURE=true to allow it on purpose)"
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ServeRefused with the reason in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ServeRefused(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ServeRefused(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum: int, frame: Any) -> None:
    sys.exit(0)
