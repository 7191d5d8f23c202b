"""A real HTTP receiver for webhook tests: ``http.server`` on 127.0.0.1 in a thread.

It records every request (headers and exact body bytes) and answers as told:
``ok`` (200), ``fail`` (500), or ``hang`` (waits ``hang_s`` before a 200).
``fail_first`` answers 500 to that many requests before obeying ``mode``.
The port can be reserved while the server is down (:meth:`stop` then
:meth:`start` on the same port) to play a receiver that is down for a while.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value

    def signature_ok(self, secret: str) -> bool:
        expected = hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-scanqueue-signature", ""))


class Receiver:
    def __init__(self, port: int, mode: str = "ok", hang_s: float = 30.0) -> None:
        self.port = port
        self.mode = mode
        self.hang_s = hang_s
        self.fail_first = 0
        self.arrivals = 0  # requests read, answered or still hanging
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.arrivals += 1
                    failing = receiver.fail_first > 0
                    if failing:
                        receiver.fail_first -= 1
                    mode = "fail" if failing else receiver.mode
                if mode == "hang":
                    receiver._release.wait(receiver.hang_s)
                status = 500 if mode == "fail" else 200
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            status,
                        )
                    )
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._release.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def delivered(self) -> dict[str, list[Received]]:
        """2xx requests by scan id."""
        out: dict[str, list[Received]] = {}
        for r in self.requests():
            if r.answered == 200:
                out.setdefault(r.json["scan_id"], []).append(r)
        return out
