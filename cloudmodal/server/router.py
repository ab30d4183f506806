"""The control plane's ASGI application: one table of routes, served on Starlette.

Every route is declared once, as a :class:`Route`: method, path template, who may call it, the msgpack body
model it takes and an async handler whose other parameters are path and query parameters (and ``who``, the
caller's :class:`~cloudmodal.server.security.Identity`). :class:`TableApp` serves the table on Starlette's
routing (:class:`starlette.routing.Router`, one :class:`starlette.routing.Route` per table route and a
:class:`starlette.routing.WebSocketRoute` for each route with a WebSocket form), with its requests, responses,
WebSockets and lifespan. What stays ours is what the table says:

- **who may call**: :meth:`TableApp.authorize`, the route's access level against the bearer token's identity
  (:mod:`cloudmodal.server.security`), rechecked every ``WS_RECHECK_S`` on an open WebSocket;
- **what a request may hold**: path ids checked before anything looks them up (404), query parameters coerced
  and bounded (422, FastAPI's shape), msgpack bodies read within their caps, their time and the body budget,
  then validated against the route's model (:mod:`cloudmodal.server.http_body`);
- **what it answers**: msgpack, or a handler's :class:`Raw` bytes, :class:`RawFile` or :class:`RawStream`;
  errors as :mod:`cloudmodal.server.http_errors` shapes them, 404 and 405 included.

The router holds one :class:`starlette.routing.BaseRoute`, an index of those routes by their paths' literal
segments: a request's route is found with a few dictionary look-ups instead of a regular expression per
route, and still decided by that route's own Starlette ``matches``. FastAPI builds ``/openapi.json`` and
``/docs`` from the same table on first use (:mod:`cloudmodal.server.http_docs`): it is never imported on a
control plane's start, which a cold ``cloudmodal run`` pays for.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import operator
import os
import typing
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import BaseModel
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, WebSocketRoute
from starlette.routing import Route as StarletteRoute
from starlette.routing import Router as StarletteRouter
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from cloudmodal import exception as exc
from cloudmodal.server.http_body import BodyStream, check_length, read_body, validate
from cloudmodal.server.http_docs import MSGPACK, build_docs_app
from cloudmodal.server.http_errors import HTTPError, error_answer
from cloudmodal.server.limits import (
    INT64_MAX,
    MAX_QUERY_STR,
    QUERY_BOUNDS,
    BodyBudget,
    EdgeLimits,
    path_param_error,
)
from cloudmodal.server.security import Access, Identity, allows

__all__ = [
    "MSGPACK",
    "BodyStream",
    "HTTPError",
    "Raw",
    "RawFile",
    "RawStream",
    "Route",
    "TableApp",
    "build_docs_app",
    "validate",
]

WS_RECHECK_S = 1.0  # how long an open WebSocket trusts the token it was opened with before checking again
DEFAULT_MAX_BODY = 1 << 20  # a msgpack body whose model declares no ``max_body``
FILE_CHUNK = 1 << 20  # a file answer is sent in parts of this size
DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect")


@dataclass(frozen=True)
class Raw:
    """A handler's answer sent as it is (not msgpack-encoded)."""

    content: bytes
    media_type: str = "application/octet-stream"
    headers: Mapping[str, str] | None = None  # response headers besides its type and length


@dataclass(frozen=True)
class RawFile:
    """A handler's answer read from a file and sent in parts (never held in memory whole)."""

    path: str | os.PathLike[str]
    media_type: str = "application/octet-stream"


@dataclass(frozen=True)
class RawStream:
    """A handler's answer sent as its chunks come (never held in memory whole). A failure after the first
    chunk cuts the response short, which the client sees as a broken response, never as a whole one."""

    chunks: AsyncIterable[bytes]
    media_type: str = "application/octet-stream"


@dataclass
class Route:
    """One route. The handler's parameters: the path's ``{names}``, ``b`` (the validated body, when ``body``
    is set), for ``raw_body`` either ``body`` (a :class:`BodyStream`) or ``data`` (the body's bytes), ``who``
    (the caller's identity), and query parameters (the rest, by type; ``Annotated[int, Field(ge=.., le=..)]``
    bounds one).

    ``max_body``: the body's cap; by default the model's ``max_body`` class variable, else
    ``DEFAULT_MAX_BODY``. ``response``: the answer's type (a model, or ``list[Model]``) for the OpenAPI
    document; a read route's rows are documented by the table models they are read from."""

    method: str
    path: str
    access: Access
    handler: Callable[..., Awaitable[Any]]
    body: type[BaseModel] | None = None
    raw_body: bool = False
    max_body: int | None = None
    websocket: bool = False  # also served as a WebSocket: each message a body, each reply {"ok": answer}
    response: Any = None
    segments: tuple[str, ...] = field(init=False)
    path_params: tuple[str, ...] = field(init=False)  # the path's ``{names}``, in order
    wants_who: bool = field(init=False)  # the handler takes the caller's Identity as ``who``
    # query parameter name -> (type, default, or inspect.Parameter.empty when required)
    query: dict[str, tuple[Any, Any]] = field(init=False)
    # query parameter name -> (lowest, highest) accepted value, for numbers
    bounds: dict[str, tuple[float | None, float | None]] = field(init=False)
    streams: bool = field(init=False)  # a raw body handed over as a BodyStream (``body`` parameter)

    def __post_init__(self) -> None:
        self.segments = tuple(self.path.split("/"))
        self.path_params = tuple(s[1:-1] for s in self.segments if s.startswith("{"))
        hints = typing.get_type_hints(self.handler)
        parameters = inspect.signature(self.handler).parameters
        self.query = {}
        self.wants_who = "who" in parameters
        for name, p in parameters.items():
            if name in self.path_params or name in ("b", "data", "who", "body"):
                continue
            self.query[name] = (hints.get(name, str), p.default)
        self.streams = self.raw_body and "body" in parameters
        if self.max_body is None:
            self.max_body = getattr(self.body, "max_body", DEFAULT_MAX_BODY)
        extras = typing.get_type_hints(self.handler, include_extras=True)
        self.bounds = {}
        for name, (typ, _) in self.query.items():
            declared = _declared_bounds(extras.get(name))
            if declared is not None:
                self.bounds[name] = declared
            elif name in QUERY_BOUNDS:
                self.bounds[name] = QUERY_BOUNDS[name]
            elif scalar(typ) is int:
                self.bounds[name] = (-INT64_MAX - 1, INT64_MAX)  # what the database's integers hold


# -- query parameters ---------------------------------------------------------------------------------------
def scalar(typ: Any) -> Any:
    """``X`` of ``X | None``."""
    args = typing.get_args(typ)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None))
    return typ


def _declared_bounds(hint: Any) -> tuple[float | None, float | None] | None:
    """The (lowest, highest) a parameter's ``Annotated[..., Field(ge=.., le=..)]`` declares, if any."""
    hint = scalar(hint)
    if typing.get_origin(hint) is not typing.Annotated:
        return None
    low = high = None
    for meta in typing.get_args(hint)[1:]:
        for c in [meta, *getattr(meta, "metadata", ())]:
            if getattr(c, "ge", None) is not None:
                low = c.ge
            if getattr(c, "le", None) is not None:
                high = c.le
    return (low, high) if (low, high) != (None, None) else None


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


def _query_error(name: str, kind: str, msg: str, value: str) -> HTTPError:
    return HTTPError(
        422, [{"type": kind, "loc": ["query", name], "msg": msg, "input": value[:MAX_QUERY_STR]}]
    )


def _coerce(name: str, value: str, typ: Any, bounds: tuple[float | None, float | None] | None = None) -> Any:
    """A query string value as its parameter's type (FastAPI's rules for the scalar types used here), within
    its ``bounds``: numbers finite and in range, strings short and without control characters."""
    typ = scalar(typ)
    type_name = getattr(typ, "__name__", str(typ))
    try:
        if typ is bool:
            v = value.lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError(value)
        if typ in (int, float):
            if len(value) > 64:
                raise ValueError(value)
            number = typ(value)
        else:
            if len(value) > MAX_QUERY_STR:
                raise _query_error(
                    name, "string_too_long", f"String should have at most {MAX_QUERY_STR} characters", value
                )
            if any(c < " " or c == "\x7f" for c in value):
                raise _query_error(
                    name, "string_pattern_mismatch", "String should not hold control characters", value
                )
            return value
    except ValueError:
        raise _query_error(
            name, f"{type_name}_parsing", f"Input should be a valid {type_name}", value
        ) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise _query_error(name, "finite_number", "Input should be a finite number", value)
    low, high = bounds or (None, None)
    if low is not None and number < low:
        raise _query_error(
            name, "greater_than_equal", f"Input should be greater than or equal to {low}", value
        )
    if high is not None and number > high:
        raise _query_error(name, "less_than_equal", f"Input should be less than or equal to {high}", value)
    return number


def _check_path(params: dict[str, str]) -> None:
    """404 for a path id that cannot exist, whoever asks: before anything looks it up."""
    for name, value in params.items():
        problem = path_param_error(name, value)
        if problem is not None:
            raise HTTPError(404, problem)


# -- serving ------------------------------------------------------------------------------------------------
class _HTTPRoute(StarletteRoute):
    """A table route over HTTP (Starlette's path matching; ``HEAD`` is ``GET`` without the body). A request
    for its path with another method answers 405 in the API's error shape."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            allow = {"allow": ", ".join(sorted(self.methods))}
            await JSONResponse({"detail": "Method Not Allowed"}, 405, allow)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _Index(BaseRoute):
    """Starlette routes found by dictionary look-ups instead of one by one. Starlette's :class:`Router` tries
    its routes in order, a regular expression each: over this table's routes that is up to 17 µs of a
    worker's 40 µs request, against 2 µs here. Each route is filed under its path's shape (the number of
    segments and which are literal) and its literal segments; a request's path is looked up under each shape
    of its length (one to three), and the few routes found decide with their own ``matches``, in the routes'
    order, so what matches is exactly what Starlette's matching says. A route whose parameters are not whole
    segments (a convertor, ``/v{n}.json``) is tried on every request."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.routes = routes
        # number of segments -> [(the literal segments' getter, literal segments -> [(position, route)])]
        self._shapes: dict[int, list[tuple[Callable[[list[str]], Any], dict[Any, list[_Entry]]]]] = {}
        self._others: list[_Entry] = []
        tables: dict[tuple[int, tuple[int, ...]], dict[Any, list[_Entry]]] = {}
        for position, route in enumerate(routes):
            segments = getattr(route, "path", "").split("/")
            literal = tuple(i for i, s in enumerate(segments) if not (s.startswith("{") and s.endswith("}")))
            if any("{" in segments[i] or "}" in segments[i] for i in literal) or any(
                ":" in s for i, s in enumerate(segments) if i not in literal
            ):
                self._others.append((position, route))  # a convertor or a parameter inside a segment
                continue
            getter = operator.itemgetter(*literal)
            if (len(segments), literal) not in tables:
                tables[len(segments), literal] = {}
                self._shapes.setdefault(len(segments), []).append((getter, tables[len(segments), literal]))
            tables[len(segments), literal].setdefault(getter(segments), []).append((position, route))

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        candidates: list[BaseRoute] = []
        if scope.get("root_path"):  # mounted under a prefix (never, here): every route decides
            candidates = self.routes
        else:
            segments = scope["path"].split("/")
            found: list[_Entry] = []
            for getter, table in self._shapes.get(len(segments), ()):
                found += table.get(getter(segments), ())
            found += self._others
            if len(found) > 1:
                found.sort(key=_first)  # in the routes' order, as Starlette tries them
            candidates = [route for _, route in found]
        partial: tuple[Match, Scope] | None = None
        for route in candidates:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return match, {**child_scope, "cloudmodal.route": route}
            if match is Match.PARTIAL and partial is None:
                partial = match, {**child_scope, "cloudmodal.route": route}
        return partial or (Match.NONE, {})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["route"] = scope["cloudmodal.route"]
        await route.handle(scope, receive, send)


_Entry = tuple[int, BaseRoute]  # a route and its position in the routes


def _first(entry: _Entry) -> int:
    return entry[0]


class _FileAnswer(FileResponse):
    chunk_size = FILE_CHUNK


class _Docs:
    """``/openapi.json`` and ``/docs`` (an ASGI application): the FastAPI application documenting the table,
    built on the first request for it."""

    def __init__(self, table: TableApp) -> None:
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the documentation is an application of its own: none of our router's matching state
        inner = {k: v for k, v in scope.items() if k not in ("router", "route", "endpoint", "path_params")}
        await self.table.docs_app()(inner, receive, send)


class NeedsIO(Exception):
    """Raised by ``authenticate`` called with ``may_block`` false when its answer needs blocking work."""


class TableApp:
    """The ASGI application serving a route table (HTTP and WebSocket) on a Starlette router, with its
    lifespan and the lazily built OpenAPI documentation.

    ``authenticate(header, client_host, may_block) -> Identity`` raises :class:`HTTPError` (401) for a
    missing or bad token; called on the event loop with ``may_block`` false, it raises :class:`NeedsIO`
    where answering needs blocking work (a token not in its cache), and is then called again on the thread
    pool with ``may_block`` true. ``on_startup`` runs on the serving event loop before the first request;
    the thread pool of :meth:`run` is shut down with the server.
    """

    def __init__(
        self,
        routes: list[Route],
        authenticate: Callable[[str, str | None, bool], Identity],
        *,
        title: str = "API",
        on_startup: Callable[[asyncio.AbstractEventLoop], None] | None = None,
        threads: int = 40,
        limits: EdgeLimits | None = None,
    ) -> None:
        self.routes = routes
        self.limits = limits or EdgeLimits.from_env()
        self.budget = BodyBudget(self.limits.body_budget_bytes, self.limits.budget_wait_s)
        self.authenticate = authenticate
        self.title = title
        self.on_startup = on_startup
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._docs: Any = None
        self.router = StarletteRouter(
            self._starlette_routes(),
            redirect_slashes=False,  # "/v1/apps/" is not found, as "/v1/apps" is not "/v1/apps/"
            default=self._not_found,
            lifespan=self._lifespan,
        )

    def _starlette_routes(self) -> list[BaseRoute]:
        served: list[BaseRoute] = []
        for r in self.routes:
            name = r.handler.__name__
            endpoint = functools.partial(self._serve, r)
            served.append(_HTTPRoute(r.path, endpoint, methods=[r.method], name=name))
            if r.websocket:
                served.append(WebSocketRoute(r.path, functools.partial(self._serve_socket, r), name=name))
        docs = _Docs(self)
        served += [StarletteRoute(p, docs, include_in_schema=False) for p in DOC_PATHS]
        return [_Index(served)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self, app: object) -> AsyncIterator[None]:
        if self.on_startup is not None:
            self.on_startup(asyncio.get_running_loop())
        try:
            yield
        finally:
            self.close()

    # -- blocking work ------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the application's thread pool (database work, off the event loop)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="cp-db")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- requests -----------------------------------------------------------------------------------------
    async def authorize(self, route: Route, conn: HTTPConnection, params: dict[str, str]) -> Identity | None:
        """The caller's identity (None on public routes); 401 without a valid token, 403 when the route's
        access level (:mod:`cloudmodal.server.security`) excludes it. A token answered from memory is
        answered on the event loop; one that needs the database is read on the thread pool, so the event
        loop never waits on the database (nor on a free connection of its pool)."""
        if route.access == "public":
            return None
        client = conn.client
        header, host = conn.headers.get("authorization", ""), client.host if client else None
        try:
            who = self.authenticate(header, host, False)
        except NeedsIO:
            who = await self.run(self.authenticate, header, host, True)
        denied = allows(route.access, who, params.get("worker_id"))
        if denied is not None:
            raise HTTPError(403, denied)
        return who

    def arguments(self, route: Route, request: Request, params: dict[str, str]) -> dict[str, Any]:
        """The handler's path and query parameters (422 for a query parameter missing or out of bounds)."""
        kwargs: dict[str, Any] = dict(params)
        if route.query:
            given = request.query_params
            for name, (typ, default) in route.query.items():
                if name in given:
                    kwargs[name] = _coerce(name, given[name], typ, route.bounds.get(name))
                elif default is inspect.Parameter.empty:
                    raise HTTPError(
                        422,
                        [{"type": "missing", "loc": ["query", name], "msg": "Field required", "input": None}],
                    )
        return kwargs

    async def _serve(self, route: Route, request: Request) -> Response:
        """One request to ``route``: checked, its body read and validated, its handler's answer encoded."""
        held = 0  # bytes of the body budget this request holds until its handler is done
        try:
            params = request.path_params
            if params:
                _check_path(params)
            who = await self.authorize(route, request, params)
            kwargs = self.arguments(route, request, params)
            if route.wants_who:
                kwargs["who"] = who
            max_body = route.max_body
            assert max_body is not None  # Route.__post_init__ fills it in
            try:
                if route.streams:
                    check_length(request.headers, max_body)
                    kwargs["body"] = BodyStream(request.receive, max_body, self.limits.body_timeout_s)
                elif route.body is not None or route.raw_body:
                    raw, held = await read_body(
                        request.receive, request.headers, max_body, self.budget, self.limits.body_timeout_s
                    )
                    if route.body is not None:
                        kwargs["b"] = validate(raw, route.body)
                    else:
                        kwargs["data"] = bytes(raw)
                    del raw  # decoded: the buffer goes now, not when the handler is done
                result = await route.handler(**kwargs)
            finally:
                if held:
                    self.budget.give(held)
            if isinstance(result, RawFile):
                # stat here: a missing file is an error answer, not a broken response
                stat = await self.run(os.stat, result.path)
                return _FileAnswer(result.path, media_type=result.media_type, stat_result=stat)
            if isinstance(result, RawStream):
                return StreamingResponse(result.chunks, media_type=result.media_type)
            if isinstance(result, Raw):
                return Response(result.content, media_type=result.media_type, headers=result.headers)
            return Response(msgpack.packb(result, use_bin_type=True), media_type=MSGPACK)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        except Exception as e:
            status, payload = error_answer(e, request.method, request.scope["path"])
            return JSONResponse(payload, status, e.headers if isinstance(e, HTTPError) else None)

    async def _serve_socket(self, route: Route, websocket: WebSocket) -> None:
        """A route with ``websocket=True`` (:class:`cloudmodal.client.transport.Channel`): authorized at the
        handshake (refused with the status and body a ``POST`` would get), then each message a request body,
        each reply ``{"ok": answer}`` or ``{"status": ..., **error}``. An authorization refused on a recheck
        closes the socket (1008) after its reply."""
        await websocket.receive()  # websocket.connect
        params = websocket.path_params
        try:
            _check_path(params)
            who = await self.authorize(route, websocket, params)
        except HTTPError as e:
            await websocket.send_denial_response(JSONResponse({"detail": e.detail}, e.status_code, e.headers))
            return
        await websocket.accept()
        model, cap, handler = route.body, route.max_body, route.handler
        assert model is not None and cap is not None
        loop = asyncio.get_running_loop()
        recheck_at = loop.time() + WS_RECHECK_S
        try:
            while True:
                message = await websocket.receive()
                if message["type"] != "websocket.receive":
                    return  # websocket.disconnect
                raw = message.get("bytes")
                if raw is None:
                    raw = (message.get("text") or "").encode()
                reply: dict[str, Any]
                try:
                    # the token is checked again at least every WS_RECHECK_S, so revoking it, or the worker
                    # it belongs to stopping, ends an open socket's access within seconds as it ends a request's
                    if loop.time() >= recheck_at:
                        who = await self.authorize(route, websocket, params)
                        recheck_at = loop.time() + WS_RECHECK_S
                    if len(raw) > cap:
                        raise exc.RequestSizeError(
                            f"Message of {len(raw)} bytes is over the {cap} byte limit."
                        )
                    extra = {"who": who} if route.wants_who else {}
                    reply = {"ok": await handler(**params, **extra, b=validate(raw, model))}
                except Exception as e:
                    status, payload = error_answer(e, "WEBSOCKET", websocket.scope["path"])
                    reply = {"status": status, **payload}
                    if isinstance(e, HTTPError) and status in (401, 403):
                        await websocket.send_bytes(msgpack.packb(reply, use_bin_type=True))
                        await websocket.close(1008)
                        return
                await websocket.send_bytes(msgpack.packb(reply, use_bin_type=True))
        except WebSocketDisconnect:
            return  # the client went while its request was being answered

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No route for the path (a WebSocket's handshake too): 404 ``{"detail": "Not Found"}``."""
        response = JSONResponse({"detail": "Not Found"}, 404)
        if scope["type"] == "websocket":
            websocket = WebSocket(scope, receive, send)
            await websocket.receive()  # websocket.connect
            await websocket.send_denial_response(response)
        else:
            await response(scope, receive, send)

    # -- documentation ------------------------------------------------------------------------------------
    def docs_app(self) -> Any:
        """The FastAPI application documenting the table (``/openapi.json``, ``/docs``), built on first use."""
        if self._docs is None:
            self._docs = build_docs_app(self.routes, self.title)
        return self._docs
