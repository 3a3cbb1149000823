"""Faults a router meets, put between the service and the real components it talks to."""

from __future__ import annotations

import contextlib
import socket
import threading


class StallingProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server (e.g. the bcoin node's RPC). While
    `stalled`, it accepts connections and never answers them: a backend that hangs, as a node
    that is overloaded or a link that drops packets does."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.stalled = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="stalling-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.stalled:
                self._held.append(conn)  # read nothing, answer nothing
                continue
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            conn.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def release(self) -> None:
        """Answer again: held connections are reset (the client retries), new ones forwarded."""
        self.stalled = False
        for conn in self._held:
            conn.close()
        self._held.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self._held:
            conn.close()
