"""Web endpoints on the control plane: requests to ``/web/{app}/{label}/…`` (or to ``LABEL--APP.DOMAIN``) go
to a worker of that endpoint's function over the tunnel the worker dialled (:mod:`cloudmodal._web_tunnel`),
so a cloud worker behind NAT serves as one on this machine does.

- **Routing**: the app segment and label name a function of a live app (:mod:`cloudmodal.web_routes`),
  looked up in the database and cached for :data:`ROUTE_CACHE_S`.
- **Capacity**: a worker holds at most its function's ``@concurrent(max_inputs=…)`` requests (1 by default,
  as Modal runs one input per container); the next request waits for a free slot.
- **Scaling**: requests waiting for a slot and requests in flight are the pool's load: the reconciler reads
  them (:meth:`WebGateway.demand`) beside the input queue, so the first request to an endpoint with no worker
  starts one, and the request is held until it connects (at most ``CLOUDMODAL_WEB_START_TIMEOUT_S``, then
  503). Demand is counted by the control plane that receives the request; with several replicas on one
  database, a request that reaches a replica other than the reconciling one waits for a worker already there.
- **Bodies stream** both ways under the tunnel's flow control; server-sent events and WebSockets pass
  through; a client that goes away cancels its handler.
- **Failures**: a worker that dies before answering gets the client a 502 naming it; one that dies mid-answer
  cuts the response short (the client sees a broken response, never a whole one). The next request goes to
  another worker, or waits for the replacement the reconciler starts.
- **Proxy auth**: an endpoint declared ``requires_proxy_auth=True`` answers 401 unless the request carries
  ``Modal-Key``/``Modal-Secret`` (or ``Cloudmodal-Key``/``Cloudmodal-Secret``) of a proxy token (``cloudmodal
  token create --proxy``); those headers are removed before the request reaches the app. Other endpoints are
  public, as in Modal: declaring one publishes it on the control plane's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select
from starlette.types import Receive, Scope, Send

from cloudmodal import _web_tunnel as wt
from cloudmodal.server import models
from cloudmodal.server.states import AppState, FunctionState, WorkerState
from cloudmodal.web_routes import DEV_SUFFIX, endpoints, parse_host

if TYPE_CHECKING:
    from cloudmodal.server.router import TableApp
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.web")


WATCH_AFTER_S = (
    0.05  # an answer later than this has its client watched for leaving (and its handler cancelled)
)
DOMAINS_CACHE_S = 5.0  # how long the custom domains' routes are trusted before a background re-read
ROUTE_CACHE_S = 1.0  # how long an (app, label) -> function look-up is trusted (a redeploy shows within it)
TOKEN_RECHECK_S = 5.0  # how often an open tunnel's worker token is checked again
PROXY_KEY_HEADERS = (b"modal-key", b"cloudmodal-key")
PROXY_SECRET_HEADERS = (b"modal-secret", b"cloudmodal-secret")
TUNNEL_PREFIX = "/v1/workers/"
TUNNEL_SUFFIX = "/web"

A = models.apps
F = models.functions


@dataclass(frozen=True)
class Target:
    """What a web path leads to: a function's endpoint (``method`` for a class's web method)."""

    function_id: str
    version: int
    method: str | None
    kind: str
    requires_proxy_auth: bool
    app_name: str
    capacity: int
    timeout: float = 300.0  # the function's timeout: how long a request waits for its answer to start


class _Stream:
    """One request (or client WebSocket) on a tunnel, as the control plane sees it."""

    __slots__ = ("answer", "closed", "inbox", "sid", "window")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[list[Any] | None] = asyncio.Queue()  # response DATA / WS frames
        self.window = wt.Window()  # request body (or client WebSocket messages) not consumed yet
        self.closed = False


class TunnelBroken(Exception):
    """The worker's tunnel closed while a request was on it."""


@dataclass(eq=False)
class Tunnel:
    """One worker's tunnel: the WebSocket it dialled and the requests on it."""

    worker_id: str
    function_id: str
    version: int
    capacity: int
    outbox: wt.Outbox
    in_flight: int = 0
    draining: bool = False
    closed: bool = False
    next_sid: int = 1
    streams: dict[int, _Stream] = field(default_factory=dict)

    async def send(self, frame: list[Any]) -> None:
        if self.closed:
            raise TunnelBroken(self.worker_id)
        try:
            await self.outbox.send(frame)
        except wt.StreamClosed:
            raise TunnelBroken(self.worker_id) from None

    def open(self) -> _Stream:
        sid = self.next_sid
        self.next_sid += 1
        stream = self.streams[sid] = _Stream(sid)
        return stream

    def on_frame(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == wt.DRAINING:
            self.draining = True
            return
        stream = self.streams.get(frame[1])
        if stream is None:
            return  # a stream that ended (a late credit, a cancelled request's tail)
        if kind in (wt.RESPONSE, wt.WS_ACCEPT, wt.ERROR):
            if not stream.answer.done():
                stream.answer.set_result(frame)
            elif kind == wt.ERROR:  # failed mid-answer: the response is cut short
                stream.closed = True
                stream.inbox.put_nowait(None)
        elif kind == wt.CREDIT:
            stream.window.give(frame[2])
        elif kind == wt.WS_CLOSE and not stream.answer.done():
            stream.answer.set_result(frame)  # refused before accepting
        else:  # DATA, WS_MESSAGE, WS_CLOSE
            stream.inbox.put_nowait(frame)

    def break_all(self) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.closed = True
            stream.window.close()
            if not stream.answer.done():
                stream.answer.set_exception(TunnelBroken(self.worker_id))
            stream.inbox.put_nowait(None)
        self.streams.clear()


class _Pool:
    """The tunnels of one function and the requests waiting for a slot on one of them."""

    __slots__ = ("failure", "failures", "in_flight", "last_request_at", "tunnels", "waiters", "waiting")

    def __init__(self) -> None:
        self.tunnels: list[Tunnel] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.waiting = 0
        self.in_flight = 0
        self.last_request_at = 0.0
        self.failures = 0  # bumped when the function's workers keep failing to start
        self.failure = ""  # ... and why

    def free(self, version: int) -> Tunnel | None:
        best: Tunnel | None = None
        for t in self.tunnels:
            if t.closed or t.draining or t.version < version or t.in_flight >= t.capacity:
                continue
            if best is None or t.in_flight < best.in_flight:
                best = t
        return best

    def wake(self) -> None:
        while self.waiters:
            fut = self.waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return


class WebGateway:
    """The control plane's web front: ``wrap(api)`` is the ASGI application uvicorn serves."""

    def __init__(self, cp: ControlPlane, api: TableApp) -> None:
        self.cp = cp
        self.api = api
        self.pools: dict[str, _Pool] = {}
        self._routes: dict[tuple[str, str], tuple[float, Target | None]] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Future[Target | None]] = {}
        self._domains: dict[str, tuple[str, str]] | None = None  # custom domain -> (app, label)
        self._domains_at = 0.0
        self._domains_task: asyncio.Future[None] | None = None
        from cloudmodal.settings import settings

        self.domain = settings().web_domain
        self.start_timeout_s = settings().web_start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the reconciler's view -------------------------------------------------------------------------
    def demand(self) -> dict[str, tuple[int, int, float]]:
        """Per function: (requests waiting for a slot, requests in flight, time of the last request). Read
        from the reconciler's thread: a copy, never a live view."""
        return {
            fid: (p.waiting, p.in_flight, p.last_request_at)
            for fid, p in list(self.pools.items())
            if p.waiting or p.in_flight or p.last_request_at
        }

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """``fn`` on the serving event loop, from any thread (nothing to do before the first request)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    def draining(self, worker_id: str) -> None:
        """The worker is draining: it finishes the requests it holds and is given no new ones (any thread)."""

        def mark() -> None:
            for pool in self.pools.values():
                for t in pool.tunnels:
                    if t.worker_id == worker_id:
                        t.draining = True

        self._on_loop(mark)

    def fail_waiting(self, function_id: str, message: str) -> None:
        """The function's workers keep failing to start: the requests waiting for one are answered 503 with
        ``message`` now (called from any thread)."""

        def fail() -> None:
            pool = self.pools.get(function_id)
            if pool is None:
                return
            pool.failures += 1
            pool.failure = message
            for fut in pool.waiters:
                if not fut.done():
                    fut.set_result(None)
            pool.waiters.clear()

        self._on_loop(fail)

    # -- ASGI ------------------------------------------------------------------------------------------
    def wrap(self, api: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """The ASGI application: web paths (and hosts) here, tunnels here, everything else to ``api``."""

        domain = self.domain

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            kind = scope["type"]
            if kind == "http" or kind == "websocket":
                path: str = scope["path"]
                if path.startswith("/web/"):
                    return await self.serve(scope, receive, send, None)
                host = _header(scope, b"host")
                if host is not None and (domain is not None or self._domains != {} or self._domains_stale()):
                    name = host.decode("latin-1").split(":", 1)[0].lower().rstrip(".")
                    where = parse_host(name, domain) if domain is not None else None
                    if where is None:
                        where = (await self._custom_domains()).get(name)
                    if where is not None:
                        return await self.serve(scope, receive, send, where)
                if kind == "websocket" and path.startswith(TUNNEL_PREFIX) and path.endswith(TUNNEL_SUFFIX):
                    return await self.tunnel(scope, receive, send)
            return await api(scope, receive, send)

        return app

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, by_host: tuple[str, str] | None
    ) -> None:
        """One request or WebSocket to an endpoint."""
        if by_host is None:
            parts = scope["path"].split("/", 4)  # "", "web", app, label, rest
            if len(parts) < 4 or not parts[2] or not parts[3]:
                return await _answer(scope, receive, send, 404, "Not Found: a web path is /web/APP/LABEL/…")
            app_seg, label = parts[2], parts[3]
            root = f"/web/{app_seg}/{label}"
        else:
            (app_seg, label), root = by_host, ""
        target = await self._resolve(app_seg, label)
        if target is None:
            return await _answer(
                scope, receive, send, 404, f"No web endpoint {label!r} in a live app {app_seg!r}."
            )
        if root and scope["path"] == root and scope["type"] == "http":
            # /web/app/label -> /web/app/label/: the app's root, where its relative links resolve
            return await _redirect(scope, receive, send, root + "/")
        headers = scope["headers"]
        if target.requires_proxy_auth:
            denied = await self._check_proxy_auth(headers, target.app_name)
            if denied is not None:
                return await _answer(scope, receive, send, 401, denied)
            headers = [
                h for h in headers if h[0] not in PROXY_KEY_HEADERS and h[0] not in PROXY_SECRET_HEADERS
            ]

        self._loop = asyncio.get_running_loop()
        pool = self.pools.get(target.function_id)
        if pool is None:
            pool = self.pools[target.function_id] = _Pool()
        pool.last_request_at = time.time()
        failures = pool.failures
        tunnel = await self._acquire(pool, target, self.start_timeout_s)
        if tunnel is None and pool.failures != failures:
            return await _answer(
                scope, receive, send, 503, f"The endpoint's workers fail to start: {pool.failure}"
            )
        if tunnel is None:
            return await _answer(
                scope,
                receive,
                send,
                503,
                f"No worker of {label!r} became ready within {self.start_timeout_s:g}s "
                "(CLOUDMODAL_WEB_START_TIMEOUT_S); `cloudmodal app logs` shows why.",
            )
        wire = _wire_scope(scope, headers, root)
        try:
            if scope["type"] == "http":
                await self._http(tunnel, target, wire, receive, send)
            else:
                await self._websocket(tunnel, target, wire, receive, send)
        finally:
            tunnel.in_flight -= 1
            pool.in_flight -= 1
            pool.last_request_at = time.time()
            pool.wake()

    async def _acquire(self, pool: _Pool, target: Target, timeout: float) -> Tunnel | None:
        tunnel = pool.free(target.version)
        if tunnel is None:
            deadline = time.monotonic() + timeout
            pool.waiting += 1
            failures = pool.failures
            try:
                self._poke(target.function_id)
                while tunnel is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or pool.failures != failures:
                        return None
                    fut = asyncio.get_running_loop().create_future()
                    pool.waiters.append(fut)
                    try:
                        await asyncio.wait_for(fut, min(left, 1.0))
                    except TimeoutError:
                        pass
                    finally:
                        if fut in pool.waiters:
                            pool.waiters.remove(fut)
                    tunnel = pool.free(target.version)
            finally:
                pool.waiting -= 1
        tunnel.in_flight += 1
        pool.in_flight += 1
        if tunnel.in_flight < tunnel.capacity:
            pool.wake()  # room left: the next waiter may take it too
        return tunnel

    def _poke(self, function_id: str) -> None:
        rec = self.cp.reconciler
        if rec is not None:
            rec.poke(function_id)

    # -- HTTP -----------------------------------------------------------------------------------------
    async def _http(
        self, tunnel: Tunnel, target: Target, wire: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        stream = tunnel.open()
        sid = stream.sid
        pump: asyncio.Task[None] | None = None
        late: asyncio.TimerHandle | None = None
        started = False
        try:
            first = await receive()
            if first["type"] == "http.disconnect":
                return
            body, more = first.get("body", b""), first.get("more_body", False)
            if len(body) > wt.CHUNK:
                parts = wt.chunks(body)
                body, rest = parts[0], parts[1:]
            else:
                rest = []
            await tunnel.send([wt.REQUEST, sid, target.method, wire, body, bool(more or rest)])
            await stream.window.take(len(body))
            if more or rest:  # the rest of the body goes over, and then the pump watches for a disconnect
                pump = asyncio.create_task(self._pump_request(tunnel, stream, receive, rest, more))
            else:
                # A whole request: most answers come back at once, and watching for the client leaving (a
                # task per request) only pays for slow ones, so the watch starts if the answer is late.
                def watch() -> None:
                    nonlocal pump
                    pump = asyncio.create_task(self._pump_request(tunnel, stream, receive, [], False))

                late = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
            try:
                answer = await asyncio.wait_for(asyncio.shield(stream.answer), target.timeout)
            except TunnelBroken:
                return await _answer_http(
                    send,
                    502,
                    f"The worker serving this request ({tunnel.worker_id}) stopped before answering.",
                )
            except TimeoutError:  # the handler is cancelled; the client is told why
                if not tunnel.closed:
                    await tunnel.send([wt.CANCEL, sid])
                return await _answer_http(
                    send,
                    504,
                    f"The endpoint did not answer within its function's timeout ({target.timeout:g} s).",
                )
            if answer[0] == wt.ERROR:
                return await _answer_http(send, 502, f"The endpoint failed before answering: {answer[2]}")
            _, _, status, headers, body, more = answer
            if more and pump is None:  # a streamed answer (SSE...): its client may leave mid-way
                if late is not None:
                    late.cancel()
                pump = asyncio.create_task(self._pump_request(tunnel, stream, receive, [], False))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            started = True
            await send({"type": "http.response.body", "body": body, "more_body": more})
            while more:
                frame = await stream.inbox.get()
                if frame is None:
                    if stream.closed:
                        raise TunnelBroken(tunnel.worker_id)  # cut short: the client sees a broken response
                    break
                _, _, body, more = frame
                await send({"type": "http.response.body", "body": body, "more_body": more})
                if body and more:
                    await tunnel.send([wt.CREDIT, sid, len(body)])
        except TunnelBroken:
            if not started:
                await _answer_http(
                    send,
                    502,
                    f"The worker serving this request ({tunnel.worker_id}) stopped before answering.",
                )
                return
            raise
        finally:
            if late is not None:
                late.cancel()
            if pump is not None:
                pump.cancel()
            tunnel.streams.pop(sid, None)

    async def _pump_request(
        self, tunnel: Tunnel, stream: _Stream, receive: Receive, rest: list[bytes], more: bool
    ) -> None:
        """The rest of the request body to the worker (within its window); then wait for the client to go
        away, and cancel the handler if it goes before the response is complete."""
        sid = stream.sid
        try:
            for i, part in enumerate(rest):
                await stream.window.take(len(part))
                await tunnel.send([wt.DATA, sid, part, more or i < len(rest) - 1])
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                body = message.get("body", b"")
                more = message.get("more_body", False)
                parts = wt.chunks(body)
                for i, part in enumerate(parts):
                    await stream.window.take(len(part))
                    await tunnel.send([wt.DATA, sid, part, more or i < len(parts) - 1])
            else:
                message = await receive()  # http.disconnect: the client left, or the response is complete
            if sid in tunnel.streams and not tunnel.closed:
                await tunnel.send([wt.CANCEL, sid])
                tunnel.streams.pop(sid, None)
        except (wt.StreamClosed, TunnelBroken, asyncio.CancelledError):
            return
        except Exception:
            log.exception("web request body pump failed")

    # -- WebSocket ------------------------------------------------------------------------------------
    async def _websocket(
        self, tunnel: Tunnel, target: Target, wire: dict[str, Any], receive: Receive, send: Send
    ) -> None:
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        stream = tunnel.open()
        sid = stream.sid
        try:
            await tunnel.send([wt.REQUEST, sid, target.method, wire, b"", False])
            try:
                answer = await stream.answer
            except TunnelBroken:
                await send({"type": "websocket.close", "code": 1011})
                return
            if answer[0] != wt.WS_ACCEPT:
                code = answer[2] if answer[0] == wt.WS_CLOSE else 1011
                await send({"type": "websocket.close", "code": code or 1000})
                return
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": answer[2],
                    "headers": [tuple(h) for h in answer[3]],
                }
            )
            downstream = asyncio.create_task(self._ws_to_client(tunnel, stream, send))
            try:
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        if not tunnel.closed and sid in tunnel.streams:
                            await tunnel.send([wt.WS_CLOSE, sid, message.get("code", 1000), ""])
                        return
                    data = message.get("bytes")
                    if data is None:
                        data = message.get("text", "")
                    await stream.window.take(len(data))
                    await tunnel.send([wt.WS_MESSAGE, sid, data])
                    if downstream.done():
                        return
            finally:
                downstream.cancel()
        except (TunnelBroken, wt.StreamClosed):
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
        finally:
            tunnel.streams.pop(sid, None)

    async def _ws_to_client(self, tunnel: Tunnel, stream: _Stream, send: Send) -> None:
        while True:
            frame = await stream.inbox.get()
            if frame is None or frame[0] == wt.WS_CLOSE:
                code = frame[2] if frame is not None else 1011
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": code or 1000})
                return
            data = frame[2]
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
            if not tunnel.closed:
                await tunnel.send([wt.CREDIT, stream.sid, len(data)])

    # -- tunnels --------------------------------------------------------------------------------------
    async def tunnel(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/v1/workers/{worker_id}/web``: a worker's tunnel, with that worker's own token."""
        from starlette.websockets import WebSocket, WebSocketDisconnect

        from cloudmodal.server.http_errors import HTTPError
        from cloudmodal.server.security import allows

        ws = WebSocket(scope, receive, send)
        await ws.receive()  # websocket.connect
        worker_id = scope["path"][len(TUNNEL_PREFIX) : -len(TUNNEL_SUFFIX)]
        try:
            who = await self._authenticate(ws)
            denied = allows("worker", who, worker_id)
            if denied is not None:
                raise HTTPError(403, denied)
            row = await self.api.run(self.cp.workers.worker_row, worker_id)
        except Exception as e:
            from starlette.responses import JSONResponse

            status = e.status_code if isinstance(e, HTTPError) else 404
            detail = e.detail if isinstance(e, HTTPError) else "Unknown worker."
            await ws.send_denial_response(JSONResponse({"detail": detail}, status))
            return
        fid = row["function_id"]
        spec = await self.api.run(self.cp.functions.spec_of, fid)
        capacity = spec.concurrency.max_inputs if spec.concurrency else 1
        self._loop = asyncio.get_running_loop()
        await ws.accept()
        t = Tunnel(worker_id, fid, row["function_version"], max(1, capacity), wt.Outbox(ws.send_bytes))
        t.draining = row["state"] != WorkerState.STARTING and row["state"] != WorkerState.READY
        pool = self.pools.get(fid)
        if pool is None:
            pool = self.pools[fid] = _Pool()
        pool.tunnels.append(t)
        for _ in range(t.capacity):
            pool.wake()
        loop = asyncio.get_running_loop()
        recheck_at = loop.time() + TOKEN_RECHECK_S
        try:
            while True:
                message = await ws.receive()
                if message["type"] != "websocket.receive":
                    break
                raw = message.get("bytes")
                if raw:
                    for frame in wt.frames_of(raw):
                        t.on_frame(frame)
                if loop.time() >= recheck_at:  # a revoked token or a stopped worker ends the tunnel
                    recheck_at = loop.time() + TOKEN_RECHECK_S
                    who = await self._authenticate(ws)
                    if allows("worker", who, worker_id) is not None:
                        break
        except (WebSocketDisconnect, HTTPError):
            pass
        except Exception:
            log.exception("web tunnel of %s failed", worker_id)
        finally:
            pool.tunnels.remove(t)
            t.outbox.close()
            t.break_all()
            pool.wake()
            with contextlib.suppress(Exception):
                await ws.close()

    async def _authenticate(self, conn: Any) -> Any:
        from cloudmodal.server.router import NeedsIO

        header = conn.headers.get("authorization", "")
        host = conn.client.host if conn.client else None
        try:
            return self.api.authenticate(header, host, False)
        except NeedsIO:
            return await self.api.run(self.api.authenticate, header, host, True)

    async def _check_proxy_auth(self, headers: list[tuple[bytes, bytes]], app_name: str) -> str | None:
        key = secret = None
        for k, v in headers:
            if k in PROXY_KEY_HEADERS:
                key = v.decode("latin-1")
            elif k in PROXY_SECRET_HEADERS:
                secret = v.decode("latin-1")
        if not key or not secret:
            return (
                "This endpoint requires proxy auth: send the Modal-Key and Modal-Secret headers of a proxy "
                "token (`cloudmodal token create --proxy`)."
            )
        who = self.cp.tokens.identify(secret, read=False)
        if who is _not_cached():
            who = await self.api.run(self.cp.tokens.identify, secret)
        if who is None or who.kind != "proxy" or who.principal != key:
            return (
                "Invalid proxy token: Modal-Key and Modal-Secret must be a live proxy token's id and secret."
            )
        if who.apps is not None and app_name not in who.apps:
            return f"This proxy token is not valid for app {app_name!r}."
        return None

    # -- routing --------------------------------------------------------------------------------------
    async def _custom_domains(self) -> dict[str, tuple[str, str]]:
        """Custom domains (``custom_domains=[...]``) of deployed apps' endpoints -> (app, label). Read once
        before the first request that needs it, then refreshed in the background every
        :data:`DOMAINS_CACHE_S`, so a request never waits on the database for a host that is not one."""
        now = time.monotonic()
        if self._domains_task is None and now >= self._domains_at:
            self._domains_task = asyncio.ensure_future(self._refresh_domains())
        if self._domains is None and self._domains_task is not None:
            await asyncio.shield(self._domains_task)
        return self._domains or {}

    def _domains_stale(self) -> bool:
        return time.monotonic() >= self._domains_at

    def domains_changed(self) -> None:
        """A deployment declared custom domains: the next request reads them afresh (any thread)."""
        self._domains = None
        self._domains_at = 0.0

    async def _refresh_domains(self) -> None:
        try:
            self._domains = await self.api.run(custom_domain_routes, self.cp)
        except Exception:
            log.exception("reading web endpoints' custom domains failed")
            self._domains = self._domains or {}
        finally:
            self._domains_at = time.monotonic() + DOMAINS_CACHE_S
            self._domains_task = None

    async def _resolve(self, app_seg: str, label: str) -> Target | None:
        """The endpoint's target, from the route cache: an entry older than :data:`ROUTE_CACHE_S` is still
        answered while one look-up refreshes it in the background, and concurrent misses share one look-up."""
        key = (app_seg, label)
        hit = self._routes.get(key)
        if hit is not None:
            if hit[0] <= time.monotonic() and key not in self._refreshing:
                self._refreshing[key] = asyncio.ensure_future(self._refresh(key))
            return hit[1]
        pending = self._refreshing.get(key)
        if pending is None:
            pending = self._refreshing[key] = asyncio.ensure_future(self._refresh(key))
        return await asyncio.shield(pending)

    async def _refresh(self, key: tuple[str, str]) -> Target | None:
        try:
            target = await self.api.run(self._lookup, *key)
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[key] = (time.monotonic() + ROUTE_CACHE_S, target)
            return target
        finally:
            self._refreshing.pop(key, None)

    def _lookup(self, app_seg: str, label: str) -> Target | None:
        """The live app ``app_seg`` names (a deployed app; ``NAME-dev``: the newest running ephemeral app
        ``NAME``) and its function serving ``label``."""
        with self.cp.db.read() as conn:
            app = conn.execute(
                select(A.c.id, A.c.name).where(
                    and_(A.c.name == app_seg, A.c.ephemeral.is_(False), A.c.state == AppState.DEPLOYED)
                )
            ).first()
            if app is None and app_seg.endswith(DEV_SUFFIX):
                app = conn.execute(
                    select(A.c.id, A.c.name)
                    .where(
                        and_(
                            A.c.name == app_seg[: -len(DEV_SUFFIX)],
                            A.c.ephemeral.is_(True),
                            A.c.state == AppState.RUNNING,
                        )
                    )
                    .order_by(A.c.created_at.desc())
                ).first()
            if app is None:
                return None
            rows = conn.execute(
                select(F.c.id, F.c.version).where(
                    and_(F.c.app_id == app.id, F.c.parent_id.is_(None), F.c.state == FunctionState.ACTIVE)
                )
            ).all()
        for fid, version in rows:
            spec = self.cp.functions.spec_of(fid)
            for lbl, method, web in endpoints(spec):
                if lbl == label:
                    capacity = spec.concurrency.max_inputs if spec.concurrency else 1
                    return Target(
                        fid,
                        version,
                        method,
                        web.kind,
                        web.requires_proxy_auth,
                        app.name,
                        max(1, capacity),
                        float(spec.timeout),
                    )
        return None


def custom_domain_routes(cp: ControlPlane) -> dict[str, tuple[str, str]]:
    """Every custom domain of a deployed app's live endpoint -> (app name, label); a domain two apps
    declare goes to the one deployed first (deploying the second is refused, see :func:`domain_conflicts`)."""
    with cp.db.read() as conn:
        rows = conn.execute(
            select(F.c.id, A.c.name)
            .select_from(F.join(A, A.c.id == F.c.app_id))
            .where(
                and_(
                    A.c.state == AppState.DEPLOYED,
                    F.c.state == FunctionState.ACTIVE,
                    F.c.parent_id.is_(None),
                )
            )
            .order_by(A.c.created_at)
        ).all()
    out: dict[str, tuple[str, str]] = {}
    for fid, app_name in rows:
        for label, _method, web in endpoints(cp.functions.spec_of(fid)):
            for d in web.custom_domains:
                out.setdefault(d, (app_name, label))
    return out


def domain_conflicts(cp: ControlPlane, app_id: str, domains: set[str]) -> list[str]:
    """The ``domains`` another deployed app's endpoint already has (a deploy that claims one is refused)."""
    if not domains:
        return []
    with cp.db.read() as conn:
        app_name = conn.execute(select(A.c.name).where(A.c.id == app_id)).scalar()
    taken = custom_domain_routes(cp)
    return sorted(f"{d} (app {taken[d][0]!r})" for d in domains if d in taken and taken[d][0] != app_name)


def _not_cached() -> Any:
    from cloudmodal.server.auth import NOT_CACHED

    return NOT_CACHED


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


def _wire_scope(scope: Scope, headers: list[Any], root: str) -> dict[str, Any]:
    client = scope.get("client")
    return {
        "type": scope["type"],
        "method": scope.get("method", "GET"),
        "scheme": scope.get("scheme", "http"),
        "http_version": scope.get("http_version", "1.1"),
        "path": scope["path"],
        "raw_path": scope.get("raw_path") or scope["path"].encode(),
        "root_path": root,
        "query_string": scope.get("query_string", b""),
        "headers": wt.wire_headers(headers),
        "client": list(client) if client else None,
        "subprotocols": list(scope.get("subprotocols") or ()),
    }


async def _answer_http(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, text: str) -> None:
    """An answer of the gateway's own: plain text over HTTP, a refused handshake for a WebSocket."""
    if scope["type"] == "websocket":
        from starlette.responses import PlainTextResponse
        from starlette.websockets import WebSocket

        ws = WebSocket(scope, receive, send)
        await ws.receive()
        await ws.send_denial_response(PlainTextResponse(text + "\n", status))
        return
    await _answer_http(send, status, text)


async def _redirect(scope: Scope, receive: Receive, send: Send, location: str) -> None:
    qs = scope.get("query_string") or b""
    target = location.encode() + (b"?" + qs if qs else b"")
    await send(
        {
            "type": "http.response.start",
            "status": 307,
            "headers": [(b"location", target), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})
