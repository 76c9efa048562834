"""A real TCP fault injector for storage tests: a proxy in front of a server that resets every connection
during an outage window, then forwards bytes both ways."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class FlakyProxy:
    def __init__(self, target_port: int, outage_s: float):
        self.target = ("127.0.0.1", target_port)
        self.outage_until = 0.0
        self.outage_s = outage_s
        self.dropped = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()

    def start_outage(self) -> None:
        self.outage_until = time.time() + self.outage_s

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if time.time() < self.outage_until:
                self.dropped += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST: the client sees "connection reset"
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @contextlib.contextmanager
    def running(self) -> Iterator[FlakyProxy]:
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self._stop.set()
            t.join(timeout=5)
            self.sock.close()
