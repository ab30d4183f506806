"""A small TCP proxy for tests: one address on 127.0.0.1 in front of several backends (control-plane
replicas), as a load balancer would be.

Each new connection goes to the next backend in turn (round robin), skipping backends marked dead and those
whose connect fails; a connection no backend accepts is closed at once. Bytes are copied both ways by two
threads per connection; when either side closes (or fails), both sides are closed, so a backend that dies
takes its connections with it and the clients on them see the break and reconnect (through the proxy, to a
backend that answers).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence

CONNECT_TIMEOUT_S = 2.0


class TcpProxy:
    """``TcpProxy([(host, port), ...]).start()``; ``url`` is its address as ``http://127.0.0.1:PORT``.
    ``connections[i]``: how many connections went to backend ``i``; ``refused[i]``: connects to it that
    failed. ``mark_dead(i)``: no new connection goes to backend ``i`` (and those open to it are cut)."""

    def __init__(self, backends: Sequence[tuple[str, int]] = ()) -> None:
        """``backends`` may be given later (:meth:`set_backends`), before :meth:`start`: the proxy's address
        is known from construction, e.g. to hand it to the backends themselves."""
        self._lock = threading.Lock()
        self.set_backends(backends)
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    def set_backends(self, backends: Sequence[tuple[str, int]]) -> None:
        with self._lock:
            self.backends = list(backends)
            self.connections = [0] * len(self.backends)
            self.refused = [0] * len(self.backends)
            self.unrouted = 0  # connections no backend took
            self._dead: set[int] = set()
            self._next = 0
            self._open: dict[int, set[socket.socket]] = {i: set() for i in range(len(self.backends))}

    def start(self) -> TcpProxy:
        if not self.backends:
            raise ValueError("TcpProxy needs at least one backend: set_backends() before start().")
        self._thread.start()
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def mark_dead(self, index: int) -> None:
        """Route nothing more to backend ``index``, and cut the connections open to it."""
        with self._lock:
            self._dead.add(index)
            socks = list(self._open[index])
        for s in socks:
            _close(s)

    def close(self) -> None:
        self._closed.set()
        _close(self._listener)
        with self._lock:
            socks = [s for group in self._open.values() for s in group]
        for s in socks:
            _close(s)
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    # -- internals --------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            threading.Thread(target=self._serve, args=(client,), name="tcp-proxy-conn", daemon=True).start()

    def _order(self) -> list[int]:
        """The backends to try for a new connection: the next in turn first, the dead ones left out."""
        with self._lock:
            n = len(self.backends)
            start = self._next
            self._next = (self._next + 1) % n
            return [i for i in ((start + k) % n for k in range(n)) if i not in self._dead]

    def _connect(self) -> tuple[int, socket.socket] | None:
        for i in self._order():
            try:
                upstream = socket.create_connection(self.backends[i], timeout=CONNECT_TIMEOUT_S)
            except OSError:
                with self._lock:
                    self.refused[i] += 1
                continue
            upstream.settimeout(None)
            with self._lock:
                if i in self._dead:  # marked dead while connecting
                    _close(upstream)
                    continue
                self.connections[i] += 1
            return i, upstream
        return None

    def _serve(self, client: socket.socket) -> None:
        got = self._connect()
        if got is None:
            with self._lock:
                self.unrouted += 1
            _close(client)
            return
        i, upstream = got
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open[i].update((client, upstream))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                # either side closing closes both: the other pump's recv returns and it ends too
                _close(client)
                _close(upstream)

        back = threading.Thread(target=pump, args=(upstream, client), name="tcp-proxy-back", daemon=True)
        back.start()
        pump(client, upstream)
        back.join()
        with self._lock:
            self._open[i].difference_update((client, upstream))


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it (close alone may not)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
