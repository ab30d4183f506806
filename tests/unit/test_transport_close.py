"""Transport.close() while another thread's request is in flight: that request keeps its connection and gets
its answer, and the client is closed when it returns (closing a socket under a thread waiting on it hands
that thread's TLS layer a descriptor number the next open reuses)."""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgpack
import pytest

from cloudmodal import exception as exc
from cloudmodal import tls
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


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client gone mid-answer (the old close() of the negative control) is not this test's news


@contextlib.contextmanager
def _serve(context: ssl.SSLContext | None = None) -> Iterator[tuple[str, type[_Slow]]]:
    handler = type("Handler", (_Slow,), {"entered": threading.Event(), "release": threading.Event()})
    httpd = _Quiet(("127.0.0.1", 0), handler)
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    scheme = "https" if context is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Slow]]]:
    with _serve() as served:
        yield served


def _slow_request(t: Transport, handler: type[_Slow]) -> tuple[threading.Thread, dict[str, Any]]:
    """``GET /slow`` on a thread of its own, returned once the server holds it; its answer or error lands in
    the dict (the error is what the old close() gave it: a connection closed under it)."""
    got: dict[str, Any] = {}

    def slow() -> None:
        try:
            got["answer"] = t.get("/slow")
        except Exception as e:
            got["error"] = e

    th = threading.Thread(target=slow)
    th.start()
    assert handler.entered.wait(60)
    return th, got


def test_a_request_in_flight_outlives_close_and_closes_the_client(server: tuple[str, type[_Slow]]) -> None:
    url, handler = server
    t = Transport(url, "tok", reconnect_timeout=1.0)
    assert t.get("/fast") == {"path": "/fast"}
    th, got = _slow_request(t, handler)
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


def test_files_opened_after_close_are_never_written_by_a_tls_reply(tmp_path: Path) -> None:
    """The failure this guards against, end to end: over TLS, close() while a request waits for its answer,
    then open files (one of them would get the socket's number) and let the answer come. The files are
    untouched and the request is answered. With the old close() the first file's bytes 5.. became a TLS
    record (OpenSSL reading the file as the connection, then writing to it): an SQLite database that began
    ``SQLit\\x17\\x03\\x03...`` was "not a database"."""
    cert = tls.self_signed(tmp_path / "state", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    with _serve(ctx) as (url, handler):
        t = Transport(url, "tok", reconnect_timeout=1.0, fingerprint=cert.fingerprint)
        assert t.get("/fast") == {"path": "/fast"}
        th, got = _slow_request(t, handler)
        t.close()
        original = b"SQLite format 3\x00" + bytes(4080)
        victims = []
        for i in range(16):
            path = tmp_path / f"victim-{i}.db"
            path.write_bytes(original)
            victims.append((path, os.open(path, os.O_RDWR)))
        try:
            handler.release.set()
            th.join(60)
        finally:
            for _, fd in victims:
                os.close(fd)
        written = {p.name: p.read_bytes()[:24] for p, _ in victims if p.read_bytes() != original}
        assert written == {}
        assert got == {"answer": {"path": "/slow"}}
