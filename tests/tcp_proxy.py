"""A loopback TCP proxy that can silently stop forwarding: a half-open network, on demand.

``stall()`` makes every connection (open or new) stop moving bytes in both
directions without closing anything: the client's writes still succeed (its
kernel and the proxy's buffer them), answers never come — exactly what a
database behind a dead NAT entry or a frozen host looks like.  ``resume()``
forwards what waited.  Threads and sockets only, bound to 127.0.0.1; every wait
is bounded, and ``close()`` ends every thread it started.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

POLL_S = 0.05
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop, "proxy-accept")

    def url_for(self, url: str) -> str:
        """``url`` (a postgresql:// URL at the target) pointed at this proxy instead."""
        from sqlalchemy.engine import make_url

        return (
            make_url(url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in list(self._threads):
            thread.join(5)

    def _start(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # A stalled network does not complete new connections' conversations either.
            while not self._flowing.wait(POLL_S):
                if self._closed.is_set():
                    client.close()
                    return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._start(self._pump, "proxy-pump", client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(POLL_S):
                    continue  # stalled: read nothing, so nothing moves either way
                readable, _, _ = select.select(list(pair), [], [], POLL_S)
                for sock in readable:
                    if not self._flowing.is_set():
                        break
                    data = sock.recv(CHUNK)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.close()
