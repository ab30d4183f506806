"""A web worker's side of the web tunnel (:mod:`cloudmodal._web_tunnel`): it dials
``/v1/workers/{id}/web`` on its control plane and serves the requests that come over it with the function's
ASGI application, called in this process (no second HTTP hop on the worker):

- ``@fastapi_endpoint``: a FastAPI app with the function as its one route (at ``/``, CORS open, ``/docs``
  with ``docs=True``), as Modal builds it;
- ``@asgi_app``: the app the function returns (its lifespan started and stopped);
- ``@wsgi_app``: the WSGI app the function returns, through a2wsgi (its calls on a thread pool);
- ``@web_server(port)``: the function starts a server on ``port``; once it accepts connections (within
  ``startup_timeout``) requests are forwarded to it over loopback with httpx, WebSockets with ``websockets``.

The tunnel runs on an event loop of its own thread; a tunnel that breaks (a control plane restart) is dialled
again until the worker drains. A control plane whose TLS certificate is not the pinned one (or, unpinned, not
one this machine trusts) is not dialled again: the loop ends with one line on stderr saying why
(:attr:`WebServer.refused`), as the worker's own requests give up at once
(:mod:`cloudmodal.client.transport`). The requests in flight count as the worker's load in its heartbeats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from cloudmodal import _web_tunnel as wt
from cloudmodal.exception import ExecutionError
from cloudmodal.spec import FunctionSpec, WebConfig

ASGIApp = Callable[..., Any]
CONNECT_WAIT_S = 15.0  # how long start() waits for the first tunnel before the worker reports ready anyway


# -- the applications ------------------------------------------------------------------------------------
def build_apps(spec: FunctionSpec, fn: Any, instance: Any) -> dict[str | None, ASGIApp]:
    """The ASGI application of each web endpoint of the function (key None) or class (key: the method).
    Runs the user's factories (``@asgi_app``…), so it is called where user code may block: the main thread."""
    out: dict[str | None, ASGIApp] = {}
    if spec.web is not None:
        out[None] = _app_for(spec.web, fn)
    for method, web in spec.web_methods:
        out[method] = _app_for(web, getattr(instance, method))
    return out


def _app_for(web: WebConfig, fn: Any) -> ASGIApp:
    if web.kind == "fastapi_endpoint":
        from fastapi import FastAPI
        from fastapi.middleware.cors import CORSMiddleware

        api = FastAPI(
            docs_url="/docs" if web.docs else None,
            redoc_url=None,
            openapi_url="/openapi.json" if web.docs else None,
        )
        api.add_api_route("/", fn, methods=[web.method])
        api.add_middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=False,
        )
        return api
    if web.kind == "asgi_app":
        app = fn()
        if not callable(app):
            raise ExecutionError(f"@asgi_app function returned {app!r}, not an ASGI application.")
        return _Lifespan(app)
    if web.kind == "wsgi_app":
        from a2wsgi import WSGIMiddleware

        app = fn()
        if not callable(app):
            raise ExecutionError(f"@wsgi_app function returned {app!r}, not a WSGI application.")
        return WSGIMiddleware(app)
    assert web.kind == "web_server" and web.port is not None
    fn()
    _wait_for_port(web.port, web.startup_timeout)
    return _PortForwarder(web.port)


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise ExecutionError(
                    f"@web_server({port}): nothing accepted connections on 127.0.0.1:{port} within "
                    f"startup_timeout={timeout:g}s. Start the server in the function (listening on 0.0.0.0 or "
                    "127.0.0.1) without blocking, or raise startup_timeout."
                ) from None
            time.sleep(0.05)


class _Lifespan:
    """An ``@asgi_app``'s application, whose lifespan (startup, shutdown) the worker runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[dict[str, Any]] | None = None
        self._from_app: asyncio.Queue[dict[str, Any]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        to_app, from_app = self._to_app, self._from_app

        async def run() -> None:
            try:
                await self.app(
                    {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, to_app.get, from_app.put
                )
            except BaseException:
                await from_app.put({"type": "lifespan.unsupported"})

        self._task = asyncio.create_task(run())
        await to_app.put({"type": "lifespan.startup"})
        answer = await from_app.get()
        if answer["type"] == "lifespan.startup.failed":
            raise ExecutionError(f"The ASGI app's startup failed: {answer.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done() or self._to_app is None or self._from_app is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._from_app.get(), 10)


class _PortForwarder:
    """``@web_server``: each request and WebSocket forwarded to the user's server on a loopback port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._client: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None)

        async def body() -> Any:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        path = _app_path(scope)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        headers.append((b"host", f"127.0.0.1:{self.port}".encode()))
        if scope["root_path"]:
            headers.append((b"x-forwarded-prefix", scope["root_path"].encode()))
        request = self._client.build_request(
            scope["method"], path, headers=headers, content=body() if _has_body(scope) else None
        )
        try:
            response = await self._client.send(request, stream=True)
        except Exception as e:
            message = f"@web_server({self.port}) did not answer: {e}\n".encode()
            await send(
                {"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": message})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response.headers.raw,
                }
            )
            async for part in response.aiter_raw():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from websockets.asyncio.client import connect

        await receive()  # websocket.connect
        uri = f"ws://127.0.0.1:{self.port}{_app_path(scope)}"
        try:
            upstream = await connect(uri, subprotocols=scope.get("subprotocols") or None, max_size=None)
        except Exception:
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def down() -> None:
            async for message in upstream:
                if isinstance(message, str):
                    await send({"type": "websocket.send", "text": message})
                else:
                    await send({"type": "websocket.send", "bytes": message})
            await send({"type": "websocket.close", "code": upstream.close_code or 1000})

        task = asyncio.create_task(down())
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                await upstream.send(
                    message.get("bytes") if message.get("bytes") is not None else message.get("text", "")
                )
        finally:
            task.cancel()
            await upstream.close()


def _app_path(scope: dict[str, Any]) -> str:
    """The request's path below the endpoint's root, with its query (what a plain server expects)."""
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    qs = scope.get("query_string") or b""
    return path + ("?" + qs.decode("latin-1") if qs else "")


def _has_body(scope: dict[str, Any]) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return v != b"0"
        if k == b"transfer-encoding":
            return True
    return False


# -- the tunnel ------------------------------------------------------------------------------------------
class _Stream:
    __slots__ = (
        "disconnected",
        "done",
        "first",
        "inbox",
        "more_request",
        "sid",
        "started",
        "status",
        "task",
        "window",
    )

    def __init__(self, sid: int, first: tuple[bytes, bool]) -> None:
        self.sid = sid
        self.first: tuple[bytes, bool] | None = first
        self.more_request = first[1]
        self.inbox: asyncio.Queue[list[Any] | None] = asyncio.Queue()
        self.window = wt.Window()
        self.disconnected = asyncio.Event()
        self.status: tuple[int, list[Any]] | None = None
        self.started = False
        self.done = False
        self.task: asyncio.Task[None] | None = None


class WebServer:
    """Serves ``apps`` over the tunnel to ``url`` as worker ``worker_id`` (with its own token)."""

    def __init__(self, url: str, token: str | None, worker_id: str, apps: dict[str | None, ASGIApp]) -> None:
        self.url = url
        self.uri = "ws" + url[4:] + f"/v1/workers/{worker_id}/web"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.apps = apps
        self.streams: dict[int, _Stream] = {}
        self.loop = asyncio.new_event_loop()
        self._ws: Any = None
        self._outbox: wt.Outbox | None = None
        self._connected = threading.Event()
        self._draining = False
        self._stopped = False
        # the control plane's certificate was refused (a wrong pin): the tunnel is not dialled again
        self.refused: Exception | None = None
        self.dialler: concurrent.futures.Future[None] | None = None  # the dial loop; done once it stopped
        self._thread = threading.Thread(target=self.loop.run_forever, name="web", daemon=True)

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def start(self) -> None:
        """Start the apps' lifespans and dial the tunnel (waiting a little for the first connection)."""
        self._thread.start()
        for app in self.apps.values():
            if isinstance(app, _Lifespan):
                asyncio.run_coroutine_threadsafe(app.startup(), self.loop).result(timeout=60)
        self.dialler = asyncio.run_coroutine_threadsafe(self._dial_forever(), self.loop)
        self._connected.wait(CONNECT_WAIT_S)

    def drain(self, timeout: float) -> None:
        """Take no new requests, let those in flight finish (within ``timeout``), stop the apps."""
        if not self._thread.is_alive():
            return

        async def go() -> None:
            self._draining = True
            if self._outbox is not None:
                with contextlib.suppress(Exception):
                    await self._outbox.send([wt.DRAINING, 0])
            deadline = time.monotonic() + timeout
            while self.streams and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._stopped = True
            if self._ws is not None:
                with contextlib.suppress(Exception):
                    await self._ws.close()
            for app in self.apps.values():
                if isinstance(app, _Lifespan):
                    with contextlib.suppress(Exception):
                        await app.shutdown()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout + 15)

    async def _dial_forever(self) -> None:
        from websockets.asyncio.client import connect

        from cloudmodal.tls import env_fingerprint, untrusted_error, websocket_ssl

        pinned = websocket_ssl(self.uri, env_fingerprint())  # wss://: only the control plane's certificate
        delay = 0.1
        while not self._stopped:
            try:
                async with connect(
                    self.uri,
                    additional_headers=self.headers,
                    max_size=None,
                    compression=None,
                    open_timeout=10,
                    user_agent_header="cloudmodal-worker",
                    ssl=pinned,
                ) as ws:
                    self._ws = ws
                    self._outbox = wt.Outbox(ws.send)
                    self._connected.set()
                    delay = 0.1
                    if self._draining:
                        await self._outbox.send([wt.DRAINING, 0])
                    async for raw in ws:
                        if isinstance(raw, bytes):
                            for frame in wt.frames_of(raw):
                                self._on_frame(frame)
            except Exception as e:
                # a certificate that is not the control plane's (TlsPinError, or an unpinned worker's failed
                # verification): the same on every dial, so not dialled again (the worker's own requests
                # give up at once too); a broken connection (a restart) is
                refused = untrusted_error(self.url, e)
                if refused is not None:
                    self.refused = refused
                    print(
                        f"cloudmodal: web tunnel to the control plane refused, not dialling again: {refused}",
                        file=sys.__stderr__,
                    )
                elif not self._stopped:
                    print(
                        f"cloudmodal: web tunnel to the control plane broke ({e!r}); dialling again",
                        file=sys.__stderr__,
                    )
            finally:
                self._ws = None
                if self._outbox is not None:
                    self._outbox.close()
                    self._outbox = None
                for st in list(self.streams.values()):  # the control plane forgot them with the tunnel
                    if st.task is not None:
                        st.task.cancel()
                    st.window.close()
                self.streams.clear()
            if self._stopped or self.refused is not None:
                self._connected.set()  # start() waits for no tunnel that will not come
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _send(self, frame: list[Any]) -> None:
        outbox = self._outbox
        if outbox is None:
            raise wt.StreamClosed
        await outbox.send(frame)

    def _on_frame(self, frame: list[Any]) -> None:
        kind, sid = frame[0], frame[1]
        if kind == wt.REQUEST:
            _, _, method, scope, body, more = frame
            new = self.streams[sid] = _Stream(sid, (body, more))
            new.task = self.loop.create_task(self._serve(new, method, scope))
            return
        st = self.streams.get(sid)
        if st is None:
            return
        if kind == wt.CREDIT:
            st.window.give(frame[2])
        elif kind == wt.CANCEL:  # the client left: a handler still answering is cancelled
            st.disconnected.set()
            st.inbox.put_nowait(None)
            if (
                not st.done and st.task is not None
            ):  # (work after a complete answer, background tasks, runs on)
                st.task.cancel()
        else:  # DATA, WS_MESSAGE, WS_CLOSE
            st.inbox.put_nowait(frame)

    async def _serve(self, st: _Stream, method: str | None, wire: dict[str, Any]) -> None:
        app = self.apps.get(method)
        scope = _asgi_scope(wire)
        try:
            if app is None:
                await self._send([wt.ERROR, st.sid, f"this worker serves no web endpoint {method!r}"])
            elif scope["type"] == "websocket":
                await self._serve_websocket(st, app, scope)
            else:
                await self._serve_http(st, app, scope)
        except (asyncio.CancelledError, wt.StreamClosed):
            pass
        finally:
            self.streams.pop(st.sid, None)

    async def _serve_http(self, st: _Stream, app: ASGIApp, scope: dict[str, Any]) -> None:
        sid = st.sid

        async def receive() -> dict[str, Any]:
            if st.first is not None:
                body, more = st.first
                st.first = None
                return {"type": "http.request", "body": body, "more_body": more}
            if st.more_request:
                frame = await st.inbox.get()
                if frame is None:
                    return {"type": "http.disconnect"}
                _, _, body, more = frame
                st.more_request = more
                if body and more:
                    await self._send([wt.CREDIT, sid, len(body)])
                return {"type": "http.request", "body": body, "more_body": more}
            await st.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                st.status = (message["status"], wt.wire_headers(message.get("headers") or ()))
                return
            if kind != "http.response.body" or st.done or st.disconnected.is_set():
                return
            body = message.get("body", b"")
            more = bool(message.get("more_body", False))
            parts = wt.chunks(body)
            for i, part in enumerate(parts):
                last_more = more or i < len(parts) - 1
                if part and last_more:
                    await st.window.take(len(part))
                if not st.started:
                    assert st.status is not None, "http.response.body before http.response.start"
                    st.started = True
                    await self._send([wt.RESPONSE, sid, st.status[0], st.status[1], part, last_more])
                else:
                    await self._send([wt.DATA, sid, part, last_more])
            st.done = not more

        try:
            await app(scope, receive, send)
        except (asyncio.CancelledError, wt.StreamClosed):
            raise
        except Exception as e:
            traceback.print_exc()
            if not st.started:
                await self._send(
                    [
                        wt.RESPONSE,
                        sid,
                        500,
                        [[b"content-type", b"text/plain"]],
                        b"Internal Server Error",
                        False,
                    ]
                )
            else:
                await self._send([wt.ERROR, sid, f"{type(e).__name__}: {e}"])
            return
        if not st.done and not st.disconnected.is_set():
            if not st.started:
                await self._send([wt.ERROR, sid, "the application returned without a response"])
            else:
                await self._send([wt.DATA, sid, b"", False])

    async def _serve_websocket(self, st: _Stream, app: ASGIApp, scope: dict[str, Any]) -> None:
        sid = st.sid
        connected = False

        async def receive() -> dict[str, Any]:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            frame = await st.inbox.get()
            if frame is None:
                return {"type": "websocket.disconnect", "code": 1006}
            if frame[0] == wt.WS_CLOSE:
                return {"type": "websocket.disconnect", "code": frame[2] or 1000}
            data = frame[2]
            await self._send([wt.CREDIT, sid, len(data)])
            if isinstance(data, str):
                return {"type": "websocket.receive", "text": data}
            return {"type": "websocket.receive", "bytes": data}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "websocket.accept":
                st.started = True
                headers = wt.wire_headers(message.get("headers") or ())
                await self._send([wt.WS_ACCEPT, sid, message.get("subprotocol"), headers])
            elif kind == "websocket.send":
                data = message.get("bytes")
                if data is None:
                    data = message.get("text", "")
                await st.window.take(len(data))
                await self._send([wt.WS_MESSAGE, sid, data])
            elif kind == "websocket.close":
                st.done = True
                await self._send([wt.WS_CLOSE, sid, message.get("code", 1000), message.get("reason") or ""])
            elif kind == "websocket.http.response.start":
                st.done = True
                await self._send([wt.WS_CLOSE, sid, 1008, "refused"])

        try:
            await app(scope, receive, send)
        except (asyncio.CancelledError, wt.StreamClosed):
            raise
        except Exception:
            traceback.print_exc()
        if not st.done:
            await self._send([wt.WS_CLOSE, sid, 1011 if not st.started else 1000, ""])


def _asgi_scope(wire: dict[str, Any]) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": wire["type"],
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": wire.get("http_version", "1.1"),
        "scheme": wire.get("scheme", "http"),
        "path": wire["path"],
        "raw_path": wire.get("raw_path") or wire["path"].encode(),
        "root_path": wire.get("root_path", ""),
        "query_string": wire.get("query_string", b""),
        "headers": [(bytes(k), bytes(v)) for k, v in wire.get("headers") or ()],
        "client": tuple(wire["client"]) if wire.get("client") else None,
        "server": None,
        "state": {},
    }
    if wire["type"] == "http":
        scope["method"] = wire.get("method", "GET")
    else:
        scope["subprotocols"] = list(wire.get("subprotocols") or ())
        scope["scheme"] = "wss" if scope["scheme"] in ("https", "wss") else "ws"
    return scope
