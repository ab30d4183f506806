"""Transport.close() while another thread's request is in flight: that request keeps its connection and gets
its answer, and the client is closed when it returns (closing a socket under a thread waiting on it hands
that thread's TLS layer a descriptor number the next open reuses)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import pytest

from cloudmodal import exception as exc
from cloudmodal.client.transport import Transport


class _Slow(BaseHTTPRequestHandler):
    entered: threading.Event
    release: threading.Event

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/slow"):
            type(self).entered.set()
            type(self).release.wait(60)
        body = msgpack.packb({"path": self.path})
        self.send_response(200)
        self.send_header("content-type", "application/msgpack")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Slow]]]:
    handler = type("Handler", (_Slow,), {"entered": threading.Event(), "release": threading.Event()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


def test_a_request_in_flight_outlives_close_and_closes_the_client(server: tuple[str, type[_Slow]]) -> None:
    url, handler = server
    t = Transport(url, "tok", reconnect_timeout=1.0)
    assert t.get("/fast") == {"path": "/fast"}
    got: dict[str, Any] = {}

    def slow() -> None:
        try:
            got["answer"] = t.get("/slow")
        except Exception as e:  # what the old close() gave it: a connection closed under it
            got["error"] = e

    th = threading.Thread(target=slow)
    th.start()
    assert handler.entered.wait(60)
    t.close()
    assert not t.http.is_closed  # the request in flight holds it open
    with pytest.raises(exc.ConnectionError, match="was closed"):
        t.get("/fast")  # nothing new starts on a closed transport (and it says so at once)
    handler.release.set()
    th.join(60)
    assert got == {"answer": {"path": "/slow"}}
    assert t.http.is_closed  # the last request in flight closed it


def test_close_with_nothing_in_flight_closes_at_once(server: tuple[str, type[_Slow]]) -> None:
    url, _ = server
    t = Transport(url, "tok")
    assert t.get("/fast") == {"path": "/fast"}
    t.close()
    assert t.http.is_closed
