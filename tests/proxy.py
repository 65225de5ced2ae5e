"""A TCP proxy in front of the broker that a test controls: a scoped broker outage.

The RabbitMQ server is shared (other engineers, other tests), so a test never stops or
restarts it. Processes under test connect through this proxy instead; ``cut()`` resets
every connection through it and refuses (resets) new ones until ``restore()``: to them the
broker is gone, to everyone else nothing happened.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from urllib.parse import urlsplit, urlunsplit


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): what a peer sees when a broker dies."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._down = threading.Event()
        self._closed = threading.Event()
        self.accepted = 0
        self.refused = 0  # connections reset while cut: the clients' reconnect attempts
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5672)

    def url(self, url: str) -> str:
        """``url`` pointed at the proxy (same user, password, vhost)."""
        parts = urlsplit(url)
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    @property
    def is_cut(self) -> bool:
        return self._down.is_set()

    def cut(self) -> None:
        """Drop every connection through the proxy and refuse new ones."""
        self._down.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def restore(self) -> None:
        self._down.clear()

    def outage(self, seconds: float) -> None:
        """The broker gone for ``seconds``, then back."""
        self.cut()
        try:
            time.sleep(seconds)
        finally:
            self.restore()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                if self._down.is_set():
                    _reset(client)
                    _reset(upstream)
                    continue
                self._pairs.append((client, upstream))
            self.accepted += 1
            threading.Thread(
                target=self._pump, args=(client, upstream), name="tcp-proxy-pump", daemon=True
            ).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while not self._closed.is_set():
                for key, _ in sel.select(timeout=0.5):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return  # cut (reset under us) or the peer went away
        finally:
            sel.close()
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))
            _reset(a)
            _reset(b)
