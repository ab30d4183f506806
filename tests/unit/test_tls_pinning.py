"""cloudmodal.tls: the generated certificate (0600, reused) and pinning against real TLS servers on loopback.

Each pinning case runs against a bare TLS server thread that records every application byte it receives, so
"refused" means more than an exception: nothing (no request line, no token) reached the wrong server. Every
refusal has its control: the same client with the right pin gets through.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudmodal import tls
from cloudmodal.client.transport import Transport
from cloudmodal.exception import ConnectionError, InvalidError


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


class BareTLSServer:
    """Accepts TLS connections with ``cert`` on 127.0.0.1; keeps what each connection sent after the
    handshake; answers a minimal HTTP 200 to anything that looks like an HTTP request."""

    def __init__(self, cert: tls.ServerCert) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert.cert_path, cert.key_path)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.handshakes = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                with self._lock:
                    self.handshakes += 1
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                with self._lock:
                    self.received.append(data)
                if data.startswith(b"GET "):
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass

    def app_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def wait_for(self, data: bytes, timeout: float = 10.0) -> bool:
        """Until ``data`` has arrived on some connection (bounded)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if data in self.app_bytes():
                return True
            time.sleep(0.02)
        return data in self.app_bytes()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def cert_a(tmp_path: Path) -> tls.ServerCert:
    return tls.self_signed(tmp_path / "a", "127.0.0.1")


@pytest.fixture
def cert_b(tmp_path: Path) -> tls.ServerCert:
    """Another self-signed certificate for the very same host names (only the key and serial differ)."""
    return tls.self_signed(tmp_path / "b", "127.0.0.1")


@pytest.fixture
def server_a(cert_a: tls.ServerCert) -> Iterator[BareTLSServer]:
    s = BareTLSServer(cert_a)
    yield s
    s.close()


@pytest.fixture
def server_b(cert_b: tls.ServerCert) -> Iterator[BareTLSServer]:
    s = BareTLSServer(cert_b)
    yield s
    s.close()


# -- fingerprints --------------------------------------------------------------------------------------------
def test_fingerprints_are_accepted_in_the_usual_spellings() -> None:
    fp = "ab" * 32
    for spelling in (fp, fp.upper(), tls.display_fingerprint(fp), f"sha256:{fp}", f"SHA256 Fingerprint={fp}"):
        assert tls.normalize_fingerprint(spelling) == fp
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(InvalidError, match="cloudmodal server status"):
            tls.normalize_fingerprint(bad)


# -- the generated certificate -------------------------------------------------------------------------------
def test_generated_certificate_is_private_reused_and_names_the_host(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask: the files must be private anyway
    try:
        first = tls.self_signed(tmp_path / "state", "10.1.2.3")
    finally:
        os.umask(old)
    assert first.generated and first.self_signed
    assert mode(first.key_path) == 0o600 and mode(first.cert_path) == 0o600
    assert mode(first.key_path.parent) == 0o700
    assert first.fingerprint == tls.cert_fingerprint(first.cert_path)
    again = tls.self_signed(tmp_path / "state", "10.1.2.3")
    assert not again.generated and again.fingerprint == first.fingerprint  # pins stay valid across restarts
    from cryptography import x509

    c = x509.load_pem_x509_certificate(first.cert_path.read_bytes())
    sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    assert {"10.1.2.3", "127.0.0.1", "::1"} <= ips and "localhost" in sans.get_values_for_type(x509.DNSName)
    # A key loosened by hand is tightened again on the next start (the control: it was loose before).
    os.chmod(first.key_path, 0o644)
    assert mode(first.key_path) == 0o644
    tls.self_signed(tmp_path / "state", "10.1.2.3")
    assert mode(first.key_path) == 0o600
    # A broken pair is replaced (a new fingerprint), not served.
    first.key_path.write_text("not a key")
    replaced = tls.self_signed(tmp_path / "state", "10.1.2.3")
    assert replaced.generated and replaced.fingerprint != first.fingerprint


def test_given_certificate_pair_is_checked_up_front(cert_a: tls.ServerCert, cert_b: tls.ServerCert) -> None:
    ok = tls.given_cert(cert_a.cert_path, cert_a.key_path)
    assert ok.fingerprint == cert_a.fingerprint and not ok.self_signed
    with pytest.raises(InvalidError, match="do not load together"):
        tls.given_cert(cert_a.cert_path, cert_b.key_path)
    with pytest.raises(InvalidError, match="no such file"):
        tls.given_cert(cert_a.cert_path.with_name("missing.pem"), cert_a.key_path)


# -- pinning ---------------------------------------------------------------------------------------------------
def test_httpx_with_the_right_pin_gets_through_and_a_wrong_pin_sends_nothing(
    server_a: BareTLSServer, cert_a: tls.ServerCert
) -> None:
    wrong = "cd" * 32
    with httpx.Client(verify=tls.httpx_verify(server_a.url, wrong)) as c:
        with pytest.raises(httpx.ConnectError) as err:  # httpx wraps it, as any failed verification
            c.get(server_a.url + "/x", headers={"authorization": "Bearer secret-token"})
    pinned = tls.pin_error(err.value)
    assert pinned is not None
    msg = str(pinned)
    assert tls.display_fingerprint(cert_a.fingerprint) in msg and tls.display_fingerprint(wrong) in msg
    assert f"--fingerprint {cert_a.fingerprint}" in msg and "cloudmodal login" in msg
    assert isinstance(pinned, ConnectionError) and isinstance(pinned, ssl.SSLError)
    with httpx.Client(verify=tls.httpx_verify(server_a.url, cert_a.fingerprint)) as c:  # the control
        assert c.get(server_a.url + "/x", headers={"authorization": "Bearer right"}).text == "ok"
    assert server_a.wait_for(b"Bearer right")
    assert b"secret-token" not in server_a.app_bytes()


def test_a_pinned_client_refuses_another_self_signed_certificate_for_the_same_host(
    server_a: BareTLSServer, server_b: BareTLSServer, cert_a: tls.ServerCert
) -> None:
    t = Transport(server_b.url, "tok-b", fingerprint=cert_a.fingerprint, reconnect_timeout=30)
    try:
        with pytest.raises(tls.TlsPinError, match="refusing to connect"):
            t.get("/x")  # not retried for reconnect_timeout: a certificate does not heal
    finally:
        t.close()
    assert b"tok-b" not in server_b.app_bytes()
    # The control: the same pin, the server that does hold that certificate.
    with httpx.Client(verify=tls.httpx_verify(server_a.url, cert_a.fingerprint)) as c:
        assert c.get(server_a.url + "/x").text == "ok"


def test_websocket_and_asyncio_connections_pin_too(server_a: BareTLSServer, cert_a: tls.ServerCert) -> None:
    from websockets.sync.client import connect

    wss = "wss" + server_a.url[5:] + "/ws"
    with pytest.raises(tls.TlsPinError):
        connect(wss, ssl=tls.websocket_ssl(wss, "ee" * 32), open_timeout=5)

    async def dial(fp: str) -> None:
        _, w = await asyncio.open_connection(
            "127.0.0.1", server_a.port, ssl=tls.pinned_context(fp), server_hostname="127.0.0.1"
        )
        w.write(b"GET /async-" + fp[:4].encode() + b" HTTP/1.1\r\n\r\n")
        await w.drain()
        w.close()

    with pytest.raises(ssl.SSLError) as err:  # asyncio's SSL protocol hands the error on as it is
        asyncio.run(asyncio.wait_for(dial("ee" * 32), 10))
    assert tls.pin_error(err.value) is not None
    asyncio.run(asyncio.wait_for(dial(cert_a.fingerprint), 10))  # the control
    assert server_a.wait_for(b"GET /async-" + cert_a.fingerprint[:4].encode())
    sent = server_a.app_bytes()
    assert b"/async-eeee" not in sent and b"GET /ws" not in sent


def test_no_data_goes_out_before_the_pin_is_checked_even_without_an_explicit_handshake(
    server_a: BareTLSServer, cert_a: tls.ServerCert
) -> None:
    """A socket wrapped with do_handshake_on_connect=False whose first act is a write: OpenSSL would do the
    handshake inside the write; the pinned socket checks first."""
    for fp, refused in (("aa" * 32, True), (cert_a.fingerprint, False)):
        raw = socket.create_connection(("127.0.0.1", server_a.port), timeout=10)
        s = tls.pinned_context(fp).wrap_socket(
            raw, server_hostname="127.0.0.1", do_handshake_on_connect=False
        )
        try:
            if refused:
                with pytest.raises(tls.TlsPinError):
                    s.sendall(b"GET /implicit-wrong HTTP/1.1\r\n\r\n")
            else:
                s.sendall(b"GET /implicit-right HTTP/1.1\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200")
        finally:
            s.close()
    assert server_a.wait_for(b"/implicit-right")
    assert b"/implicit-wrong" not in server_a.app_bytes()


def test_without_a_pin_a_self_signed_server_is_refused_at_once_with_the_way_to_trust_it(
    server_a: BareTLSServer,
) -> None:
    t = Transport(server_a.url, "tok", reconnect_timeout=30)
    try:
        with pytest.raises(ConnectionError, match="cloudmodal login https://127.0.0.1") as err:
            t.get("/x")
    finally:
        t.close()
    assert "does not trust" in str(err.value)
    assert b"tok" not in server_a.app_bytes()
