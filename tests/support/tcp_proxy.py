"""A TCP proxy on loopback in front of a Unix socket (the tests' PostgreSQL),
which the test can freeze: it then stops forwarding in both directions but
keeps every connection open, as a network cut does (no RST, no FIN: the
client only notices through its own timeouts)."""

from __future__ import annotations

import select
import socket
import threading

__all__ = ["FreezingProxy"]


class FreezingProxy:
    """Forward ``127.0.0.1:port`` to the Unix socket ``target``.

    :ivar port: the TCP port it listens on.
    :ivar frozen: set it (``freeze()``) to stop forwarding.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.frozen = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> FreezingProxy:
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def freeze(self) -> None:
        """Stop forwarding; connections stay open, new ones are accepted and
        go nowhere."""
        self.frozen.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            if self.frozen.is_set():
                self._stop.wait(0.1)  # hold everything: nothing read, nothing sent
                continue
            try:
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        a.close()
                        b.close()
                        return
                    peers[s].sendall(data)
            except OSError:
                return

    def stop(self) -> None:
        """Close everything (bounded: the threads poll every 0.1-0.2 s)."""
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(2)
