"""TLS for a control plane a team shares: its certificate, and clients and workers that pin it.

**Server.** ``cloudmodal server start --tls-cert PATH --tls-key PATH`` serves HTTPS with that pair (from a
real CA, or your own); ``--tls`` (the default when listening beyond loopback) generates a self-signed
certificate on first start (:func:`self_signed`) and reuses it on later starts, so the fingerprint clients
pinned stays valid. The SHA-256 fingerprint of the served certificate is printed on start, written to
server.json and shown by ``cloudmodal server status``.

**Clients and workers pin.** A pin is the SHA-256 fingerprint of the server's certificate (the DER bytes),
from ``CLOUDMODAL_TLS_FINGERPRINT`` or a ``cloudmodal login`` profile. Without a pin, an ``https://`` URL is
verified the usual way (system CAs and the host name): a certificate from a real CA needs no pin.

*How the pin is enforced, and why this way.* Python's ``ssl`` module has no certificate-verification
callback, and httpx/httpcore and websockets do not expose the socket between the TLS handshake and the first
request; checking the certificate on a response (``network_stream`` extension) would be too late: the bearer
token would already have gone to whoever answered. Two approaches do check before any application data:

1. Write the pinned certificate to a file and make it the only trust anchor (``check_hostname`` off). OpenSSL
   then checks the chain itself, but the client needs the whole certificate, not its fingerprint: it would
   first have to fetch it over an unverified connection (a second handshake per client, and a race with a
   server that changes its certificate meanwhile), and a pinned certificate that has expired, or one issued
   by a CA for another name, needs extra verify flags to be accepted as its own anchor.
2. An :class:`ssl.SSLContext` whose sockets verify the fingerprint themselves: ``SSLContext.sslsocket_class``
   and ``sslobject_class`` are documented hooks for the classes ``wrap_socket`` (httpcore's and
   websockets' synchronous clients) and ``wrap_bio`` (asyncio, hence the worker's asynchronous web tunnel, and
   TLS through an HTTPS proxy) return. The context does no chain or name verification (``CERT_NONE``, the
   certificate is self-signed); its sockets compare ``getpeercert(binary_form=True)``'s digest with the pin
   as soon as the handshake completes, and refuse every read or write until that check has passed (a socket
   wrapped with ``do_handshake_on_connect=False`` that wrote first would otherwise have OpenSSL do the
   handshake implicitly, unchecked).

We use (2): it needs only the fingerprint (what a person compares and what a worker's environment carries),
checks every new connection before anything is sent, and is the same object for httpx (``verify=ctx``) and
websockets (``ssl=ctx``). A mismatch raises :class:`TlsPinError`, both a
:class:`cloudmodal.exception.ConnectionError` and an :class:`ssl.SSLCertVerificationError` (so the libraries
close the connection as on any failed verification), naming both fingerprints and how to trust the new one.
The client never retries it nor falls back to anything else.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cloudmodal import exception as exc

FINGERPRINT_ENV = "CLOUDMODAL_TLS_FINGERPRINT"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 3650  # a pin is the certificate itself: its expiry matters only to clients not pinning it
_RENEW_BEFORE = dt.timedelta(days=1)
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- fingerprints ------------------------------------------------------------------------------------------------
def normalize_fingerprint(value: str) -> str:
    """``value`` (hex, any case, colons or spaces optional, an optional ``sha256:`` / ``SHA256 Fingerprint=``
    prefix as openssl prints it) as 64 lowercase hex digits; :class:`InvalidError` otherwise."""
    v = value.strip().lower()
    for prefix in ("sha256 fingerprint=", "sha256:", "sha256="):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    v = v.replace(":", "").replace(" ", "")
    if not _HEX64.fullmatch(v):
        raise exc.InvalidError(
            f"{value!r} is not a SHA-256 certificate fingerprint (64 hex digits, colons optional). "
            "`cloudmodal server status` on the control plane's machine prints it."
        )
    return v


def display_fingerprint(fp: str) -> str:
    """``AB:CD:...``: the form openssl and browsers show, for people to compare."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def cert_fingerprint(path: str | os.PathLike[str]) -> str:
    """The fingerprint of the first certificate in the PEM file ``path``."""
    text = Path(path).read_text()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise exc.InvalidError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----).")
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)]))


def env_fingerprint() -> str | None:
    """``CLOUDMODAL_TLS_FINGERPRINT`` (the setting ``tls_fingerprint``), normalized; None when unset or empty.
    Read from the environment directly: a sandbox host or a standby interpreter must not pay the settings'
    import (pydantic, ~180 ms) for it."""
    raw = os.environ.get("CLOUDMODAL_TLS_FINGERPRINT", "").strip()
    return normalize_fingerprint(raw) if raw else None


# -- the server's certificate --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerCert:
    """The certificate a control plane serves: its files and fingerprint; ``generated``: made just now."""

    cert_path: Path
    key_path: Path
    fingerprint: str
    self_signed: bool = False
    generated: bool = False


def given_cert(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> ServerCert:
    """``--tls-cert``/``--tls-key``: checked now (readable, PEM, the key matches), not at the first client."""
    cert, key = Path(cert_path).expanduser(), Path(key_path).expanduser()
    for what, p in (("--tls-cert", cert), ("--tls-key", key)):
        if not p.is_file():
            raise exc.InvalidError(f"{what} {p}: no such file.")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise exc.InvalidError(
            f"The TLS certificate {cert} and key {key} do not load together ({e.reason or e}): give the PEM "
            "certificate (its chain after it) and its unencrypted PEM private key."
        ) from None
    if key.stat().st_mode & 0o077:
        import logging

        logging.getLogger("cloudmodal").warning(
            "the TLS private key %s is readable by other users: `chmod 600 %s`", key, key
        )
    return ServerCert(cert, key, cert_fingerprint(cert))


def self_signed(state_dir: Path, host: str) -> ServerCert:
    """The control plane's self-signed certificate in ``state_dir/tls`` (both files 0600): the one made on an
    earlier start while it is valid and matches its key, else a new one (an EC P-256 key; SANs: ``host``,
    this machine's names and addresses, loopback). Two control planes starting on one state dir at once make
    one certificate (a lock)."""
    import fcntl

    from cloudmodal._files import open_private, private_dir

    d = private_dir(state_dir / "tls")
    cert, key = d / CERT_NAME, d / KEY_NAME
    with open_private(d / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _reusable(cert, key):
            for p in (cert, key):
                if p.stat().st_mode & 0o077:
                    os.chmod(p, 0o600)
            return ServerCert(cert, key, cert_fingerprint(cert), self_signed=True)
        cert_pem, key_pem = _generate(host)
        for path, data in ((key, key_pem), (cert, cert_pem)):  # the key first: a cert never lacks its key
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            with open_private(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        return ServerCert(cert, key, cert_fingerprint(cert), self_signed=True, generated=True)


def _reusable(cert: Path, key: Path) -> bool:
    if not (cert.is_file() and key.is_file()):
        return False
    from cryptography import x509

    try:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ValueError, ssl.SSLError, OSError):
        return False
    return c.not_valid_after_utc - dt.datetime.now(dt.UTC) > _RENEW_BEFORE


def san_names(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the certificate for a control plane listening on ``host`` names."""
    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1", "::1"]

    def add(name: str) -> None:
        name = name.strip().rstrip(".")
        if not name:
            return
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9*.-]{1,253}", name) and name not in dns:
                dns.append(name)
            return
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))

    add(host)
    with contextlib.suppress(OSError):
        add(socket.gethostname())
        add(socket.getfqdn())
    if host in ("0.0.0.0", "::", ""):  # every interface: the machine's addresses
        with contextlib.suppress(OSError):
            for a in socket.gethostbyname_ex(socket.gethostname())[2]:
                add(a)
        with contextlib.suppress(OSError):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect(("10.255.255.255", 9))  # UDP: sends nothing, picks the outgoing interface
                add(s.getsockname()[0])
            finally:
                s.close()
    return dns, ips


def _generate(host: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    dns, ips = san_names(host)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cloudmodal"),
            x509.NameAttribute(NameOID.COMMON_NAME, (dns[1] if len(dns) > 1 else dns[0])[:64]),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- clients: pinning ----------------------------------------------------------------------------------------
class TlsPinError(exc.ConnectionError, ssl.SSLCertVerificationError):
    """The server presented a certificate other than the pinned one."""

    def __init__(self, message: str, *, expected: str = "", presented: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.presented = presented

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:  # picklable with its keyword arguments
        return (_rebuild_pin_error, (self.message, self.expected, self.presented))


def _rebuild_pin_error(message: str, expected: str, presented: str | None) -> TlsPinError:
    return TlsPinError(message, expected=expected, presented=presented)


def mismatch_message(where: str, expected: str, presented: str | None) -> str:
    got = display_fingerprint(presented) if presented else "no certificate"
    return (
        f"The control plane at {where} presented a TLS certificate with SHA-256 fingerprint {got}, but this "
        f"client pins {display_fingerprint(expected)}; refusing to connect. If the server's certificate was "
        "replaced on purpose (compare with `cloudmodal server status` on its machine), trust the new one: "
        f"`cloudmodal login https://{where} --fingerprint {presented or '<fingerprint>'}` (or set "
        f"{FINGERPRINT_ENV}). Otherwise something between you and the server is intercepting the connection."
    )


def _check_pin(sock: Any, pin: str) -> None:
    der = sock.getpeercert(binary_form=True)
    presented = fingerprint_der(der) if der else None
    if presented != pin:
        where = sock.server_hostname or "?"
        with contextlib.suppress(OSError, AttributeError, TypeError, IndexError):
            where = f"{where}:{sock.getpeername()[1]}" if hasattr(sock, "getpeername") else where
        raise TlsPinError(mismatch_message(where, pin, presented), expected=pin, presented=presented)


class _PinnedSSLSocket(ssl.SSLSocket):
    _pin_ok = False

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        if not self._pin_ok:
            _check_pin(self, self.context.pin)  # type: ignore[attr-defined]
            self._pin_ok = True

    def _pinned(self) -> None:
        if not self._pin_ok:
            self.do_handshake()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - the base class's names
        self._pinned()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._pinned()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._pinned()
        return super().send(data, flags)


class _PinnedSSLObject(ssl.SSLObject):
    _pin_ok = False

    def do_handshake(self) -> None:
        super().do_handshake()
        if not self._pin_ok:
            _check_pin(self, self.context.pin)  # type: ignore[attr-defined]
            self._pin_ok = True

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # noqa: A002 - the base class's names
        if not self._pin_ok:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if not self._pin_ok:
            self.do_handshake()
        return super().write(data)


class _PinnedContext(ssl.SSLContext):
    sslsocket_class = _PinnedSSLSocket
    sslobject_class = _PinnedSSLObject
    pin: str


def pinned_context(fingerprint: str) -> ssl.SSLContext:
    """A client context that accepts exactly the certificate whose SHA-256 fingerprint is ``fingerprint``
    (see the module docstring)."""
    ctx = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is the identity: no CA, no host name (a tunnel is 127.0.0.1)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.pin = normalize_fingerprint(fingerprint)
    return ctx


def is_https(url: str) -> bool:
    return url.startswith(("https://", "wss://"))


def httpx_verify(url: str, fingerprint: str | None) -> ssl.SSLContext | bool:
    """httpx's ``verify=`` for ``url``: the pinned context, the default CA verification, or False for a
    plain-HTTP URL (loading the CA bundle costs every process ~35 ms it would never use)."""
    if not is_https(url):
        return False
    return pinned_context(fingerprint) if fingerprint else True


def websocket_ssl(url: str, fingerprint: str | None) -> ssl.SSLContext | None:
    """websockets' ``ssl=`` for ``url`` (a ws:// or http:// one takes none; wss:// without a pin: the default
    verification)."""
    if not is_https(url) or not fingerprint:
        return None
    return pinned_context(fingerprint)


def pin_error(e: BaseException | None) -> TlsPinError | None:
    """The :class:`TlsPinError` behind ``e`` (httpx wraps it in its ``ConnectError``), if any."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, TlsPinError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def untrusted_error(url: str, e: BaseException | None) -> exc.ConnectionError | None:
    """A clear error when ``e`` is an unpinned client's failed certificate verification (a self-signed
    control plane): retrying would not help."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, TlsPinError):
            return e
        if isinstance(e, ssl.SSLCertVerificationError):
            return exc.ConnectionError(
                f"The control plane at {url} presented a TLS certificate this machine does not trust "
                f"({e.verify_message or e.reason or e}). A self-signed control plane is trusted by pinning "
                f"its certificate: `cloudmodal login {url}` shows its fingerprint (or set {FINGERPRINT_ENV} "
                "to the fingerprint `cloudmodal server status` prints on its machine)."
            )
        e = e.__cause__ or e.__context__
        seen += 1
    return None


@dataclass(frozen=True)
class Presented:
    """What a server presents (:func:`probe`): its certificate's fingerprint, and whether the system's CAs
    verify it for the URL's host name (then it needs no pin)."""

    fingerprint: str
    ca_verified: bool
    ca_error: str | None


def probe(url: str, timeout: float = 10.0) -> Presented:
    """Connect to ``url``'s host and port, read the certificate it presents (unverified, nothing sent but the
    handshake), and check it against the system's CAs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with unverified.wrap_socket(raw, server_hostname=host) as s:
                der = s.getpeercert(binary_form=True)
    except ssl.SSLError as e:
        raise exc.ConnectionError(
            f"No TLS handshake with {host}:{port} ({e.reason or e}): is it an https:// control plane "
            "(`cloudmodal server start --tls`)?"
        ) from None
    except OSError as e:
        raise exc.ConnectionError(f"Could not reach {host}:{port}: {e}.") from None
    if not der:
        raise exc.ConnectionError(f"{host}:{port} presented no TLS certificate.")
    ca_error: str | None = None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ssl.create_default_context().wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as e:
        ca_error = str(e.verify_message or e.reason or e)
    except (ssl.SSLError, OSError) as e:
        ca_error = str(e)
    return Presented(fingerprint_der(der), ca_error is None, ca_error)
