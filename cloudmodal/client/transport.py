"""HTTP to the control plane: msgpack bodies, bearer auth, and patient reconnects.

Every request the client makes is idempotent (ids are made client-side, inputs are keyed by index), so a
request that failed because the control plane restarted is simply sent again until it answers or
``reconnect_timeout`` passes. An ``https://`` control plane is verified by the CA system, or, with
``fingerprint``, accepted only with exactly that certificate (:mod:`cloudmodal.tls`); a certificate that fails
either is not retried.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgpack

from cloudmodal import exception as exc
from cloudmodal import tls

_ERRORS: dict[str, type[exc.Error]] = {
    name: getattr(exc, name)
    for name in dir(exc)
    if isinstance(getattr(exc, name), type) and issubclass(getattr(exc, name), exc.Error)
}
_STATUS_ERRORS = {
    400: exc.InvalidError,
    401: exc.AuthError,
    403: exc.AuthError,
    404: exc.NotFoundError,
    413: exc.RequestSizeError,
    422: exc.NoProviderError,
}


class _Patience:
    """Retries until a deadline, with exponential backoff between them (50 ms doubling to 2 s). ``owner``'s
    :attr:`Transport.give_up_at`, when set, is a deadline for every retry in progress too."""

    def __init__(self, timeout: float, owner: Transport | None = None) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay = 0.05
        self.owner = owner

    def expired(self) -> bool:
        now = time.monotonic()
        cut = self.owner.give_up_at if self.owner is not None else None
        return now > self.deadline or (cut is not None and now > cut)

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 2.0)


def _unreachable(url: str, e: BaseException) -> exc.ConnectionError:
    return exc.ConnectionError(
        f"Could not reach the control plane at {url}: {e}. Is it running? "
        "`cloudmodal server status` tells; `cloudmodal server start` starts one."
    )


def warm_up() -> None:
    """Import now what a first request imports lazily (httpx's connection layer, the WebSocket client): a
    standby worker interpreter calls this while it waits, so its first request does not pay ~45 ms."""
    httpx.HTTPTransport(verify=False)  # imports httpcore and its HTTP/1.1 connection classes
    try:
        import websockets.exceptions  # noqa: F401
        import websockets.sync.client  # noqa: F401
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass


class Transport:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        reconnect_timeout: float = 120.0,
        refresh_token: Callable[[], str | None] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """``refresh_token``: where a newer token may be found when this one is refused (a restarted
        ``cloudmodal server start`` on this machine writes a new owner token to its server.json).
        ``fingerprint``: the SHA-256 fingerprint of the only certificate an ``https://`` control plane may
        present (HTTP and WebSockets alike); None: the usual CA verification."""
        self.url = url.rstrip("/")
        self.fingerprint = tls.normalize_fingerprint(fingerprint) if fingerprint else None
        self._ws_ssl: Any = None
        self.refresh_token = refresh_token
        headers = {"user-agent": "cloudmodal-client"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.reconnect_timeout = reconnect_timeout
        # a deadline (monotonic) after which no request retries any more, those waiting included: a worker
        # told to stop gives up on an unreachable control plane within its grace instead of its patience
        self.give_up_at: float | None = None
        self._local = threading.local()
        self._channels: list[dict[str, Channel]] = []  # every thread's channels, closed with the transport
        self._channels_lock = threading.Lock()
        self._headers = headers
        self.http = self._new_client()
        # requests in flight, so that close() never closes a connection another thread is reading (below)
        self._busy = 0
        self._closed = False
        self._busy_lock = threading.Lock()

    def _new_client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers=self._headers,
            timeout=httpx.Timeout(connect=5.0, read=75.0, write=60.0, pool=75.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            # Only an https:// control plane has a certificate to verify; building the verifying context
            # (loading the CA bundle) costs every process ~35 ms of its start, for a plain-HTTP loopback
            # connection that would never use it. Requests go only to base_url.
            verify=tls.httpx_verify(self.url, self.fingerprint),
        )

    def ws_ssl(self) -> Any:
        """websockets' ``ssl=`` for this control plane (the pinned context; None: ws://, or the default)."""
        if self._ws_ssl is None and self.fingerprint and tls.is_https(self.url):
            self._ws_ssl = tls.websocket_ssl(self.url, self.fingerprint)
        return self._ws_ssl

    def refreshed(self) -> bool:
        """Take a newer token from ``refresh_token`` after a 401; False when there is none."""
        if self.refresh_token is None:
            return False
        token = self.refresh_token()
        header = f"Bearer {token}" if token else None
        if header is None or header == self._headers.get("authorization"):
            return False
        self._headers["authorization"] = header
        self.http.headers["authorization"] = header
        return True

    def close(self) -> None:
        """Close every channel and the HTTP connections. A request in flight on another thread keeps its
        connection: the last one to return closes the client. Closing a socket under a thread that waits on
        it would leave that thread's TLS layer holding the bare descriptor number, which the next file this
        process opens reuses; a reply arriving then is read from that file, and OpenSSL's alert for the
        garbage is written into it."""
        with self._channels_lock:
            every = [ch for channels in self._channels for ch in channels.values()]
            self._channels.clear()
        for ch in every:
            ch.close()
        with self._busy_lock:
            self._closed = True
            idle = self._busy == 0
        if idle:
            self.http.close()

    def _enter(self) -> None:
        with self._busy_lock:
            if self._closed:
                raise exc.ConnectionError(f"The connection to the control plane at {self.url} was closed.")
            self._busy += 1

    def _leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1
            last = self._closed and self._busy == 0
        if last:
            self.http.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        raw_body: bytes | None = None,
        raw_response: bool = False,
        reconnect_timeout: float | None = None,
    ) -> Any:
        content = (
            raw_body
            if raw_body is not None
            else (msgpack.packb(body, use_bin_type=True) if body is not None else None)
        )
        headers = {
            "content-type": "application/octet-stream" if raw_body is not None else "application/msgpack"
        }
        patience = _Patience(self.reconnect_timeout if reconnect_timeout is None else reconnect_timeout, self)
        refreshed = False
        while True:
            self._enter()
            try:
                resp = self.http.request(method, path, content=content, params=params, headers=headers)
            except (httpx.TransportError, RuntimeError) as e:
                # RuntimeError: "Cannot send a request, as the client has been closed" after a fork
                refused = tls.untrusted_error(self.url, e)  # a certificate that is not the one: never retried
                if refused is not None:
                    raise refused from None
                if patience.expired():
                    raise _unreachable(self.url, e) from e
                patience.wait()
                continue
            finally:
                self._leave()  # the response is read whole: its connection is back in the pool
            if resp.status_code == 503 and not patience.expired():
                patience.wait()
                continue
            if resp.status_code == 401 and not refreshed and self.refreshed():
                refreshed = True
                continue
            if resp.status_code >= 400:
                raise _error_from(resp)
            if raw_response:
                return resp.content
            if not resp.content:
                return None
            if resp.headers.get("content-type", "").startswith("application/json"):
                return resp.json()
            return msgpack.unpackb(resp.content, raw=False)

    def channel(self, path: str) -> Channel:
        """Repeated requests to one route over a WebSocket (see :class:`Channel`)."""
        return Channel(self, path)

    def thread_channel(self, path: str) -> Channel:
        """This thread's :class:`Channel` to ``path`` (a channel carries one request at a time)."""
        channels = getattr(self._local, "channels", None)
        if channels is None:
            channels = self._local.channels = {}
            with self._channels_lock:
                self._channels.append(channels)
        ch = channels.get(path)
        if ch is None:
            ch = channels[path] = Channel(self, path)
        return ch

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body if body is not None else {}, **kw)


class Channel:
    """Requests to one route over a persistent WebSocket: each message is a request body, each reply its
    answer. A worker claims work many times a second; over a WebSocket each exchange costs a frame each
    way instead of an HTTP request and its headers. Same bodies, answers and errors as ``POST path``; the
    same patient reconnects (the routes it serves are idempotent, so a request in flight when the
    connection broke is sent again). Without the ``websockets`` package, it is plain ``POST``s.
    """

    def __init__(self, transport: Transport, path: str) -> None:
        self.t = transport
        self.path = path
        self._ws: Any = None
        self._pid = os.getpid()
        self._connect: Callable[..., Any] | None
        try:
            from websockets.sync.client import connect

            self._connect = connect
        except ImportError:  # pragma: no cover - uvicorn[standard] brings it
            self._connect = None

    def call(self, body: Any, *, reconnect_timeout: float | None = None) -> Any:
        if self._connect is None:
            return self.t.post(self.path, body, reconnect_timeout=reconnect_timeout)
        from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

        data = msgpack.packb(body, use_bin_type=True)
        patience = _Patience(
            self.t.reconnect_timeout if reconnect_timeout is None else reconnect_timeout, self.t
        )
        if self._pid != os.getpid():  # a forked child: the socket is the parent's, leave it to it
            self._ws, self._pid = None, os.getpid()
        refreshed = False
        while True:
            try:
                if self._ws is None:
                    self._ws = self._connect(
                        "ws" + self.t.url[4:] + self.path,
                        additional_headers={k: v for k, v in self.t._headers.items() if k == "authorization"},
                        compression=None,
                        max_size=None,
                        open_timeout=5,
                        user_agent_header="cloudmodal-client",
                        ssl=self.t.ws_ssl(),
                    ).__enter__()  # entered: the connection is ours to close (see close())
                self._ws.send(data)
                reply = msgpack.unpackb(self._ws.recv(timeout=75), raw=False)
                break
            except InvalidStatus as e:  # the handshake was refused: an HTTP answer with its error
                self.close()
                status = e.response.status_code
                if status == 503 and not patience.expired():
                    patience.wait()
                    continue
                if status == 401 and not refreshed and self.t.refreshed():
                    refreshed = True
                    continue
                raise _STATUS_ERRORS.get(status, exc.Error)(
                    f"Control plane refused {self.path}: HTTP {status} {e.response.body[:300]!r}"
                ) from None
            except (OSError, TimeoutError, ConnectionClosed, WebSocketException) as e:
                self.close()
                refused = tls.untrusted_error(self.t.url, e)
                if refused is not None:
                    raise refused from None
                if patience.expired():
                    raise _unreachable(self.t.url, e) from e
                patience.wait()
        if "ok" in reply:
            return reply["ok"]
        if reply.get("status") == 401 and self.t.refreshed():  # revoked while open: the server closed it
            self.close()
            return self.call(body, reconnect_timeout=reconnect_timeout)
        return_error = reply.get("error")
        if isinstance(return_error, dict):
            raise _ERRORS.get(return_error.get("type", ""), exc.Error)(return_error.get("message", ""))
        raise _STATUS_ERRORS.get(int(reply.get("status") or 500), exc.Error)(str(reply.get("detail")))

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass


def _error_from(resp: httpx.Response) -> exc.Error:
    try:
        data = resp.json()
    except (ValueError, json.JSONDecodeError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        cls = _ERRORS.get(err.get("type", ""), exc.Error)
        return cls(err.get("message", ""))
    if isinstance(data, dict) and "detail" in data:
        cls = _STATUS_ERRORS.get(resp.status_code, exc.Error)
        return cls(str(data["detail"]))
    cls = _STATUS_ERRORS.get(resp.status_code, exc.Error)
    return cls(f"Control plane answered HTTP {resp.status_code}: {resp.text[:500]}")
