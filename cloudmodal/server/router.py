"""The control plane's ASGI application: one table of routes, served by a lean router.

Every route is declared once, as a :class:`Route`: method, path template, who may call it, the msgpack body
model it takes and an async handler whose other parameters are path and query parameters. :class:`Router`
serves the table directly — matching, authentication, query parsing, body validation, errors, and the
WebSocket form of the hot routes — and builds a FastAPI application from the same table only when someone
asks for ``/openapi.json`` or ``/docs``.

Why not let FastAPI serve everything: importing FastAPI and building its routes costs about a quarter of a
second, which a cold ``cloudmodal run`` (embedded control plane, first result) would pay on every start, and
its routing, dependency solving and response classes cost several times what these handlers do on a warm
``.remote()``. The schema stays complete: the FastAPI application that documents the routes is generated
from this table, so the two cannot disagree.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import sys
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgpack
from pydantic import BaseModel, ValidationError

from cloudmodal import exception as exc
from cloudmodal.server.limits import (
    INT64_MAX,
    MAX_QUERY_STR,
    QUERY_BOUNDS,
    SMALL_BODY,
    BodyBudget,
    EdgeLimits,
    describe,
    path_param_error,
    short,
    unpack,
)
from cloudmodal.server.security import Access, Identity, allows

log = logging.getLogger("cloudmodal.server")

MSGPACK = "application/msgpack"
WS_RECHECK_S = 1.0  # how long an open WebSocket trusts the token it was opened with before checking again
DEFAULT_MAX_BODY = 1 << 20  # a msgpack body whose model declares no ``max_body``
FILE_CHUNK = 1 << 20  # a file answer is sent in parts of this size
DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect")
M = TypeVar("M", bound=BaseModel)


class HTTPError(Exception):
    """An error answered as ``{"detail": ...}`` with its status (authentication, routing, query parameters),
    and any extra response ``headers``."""

    def __init__(self, status: int, detail: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or []


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


@dataclass(frozen=True)
class Raw:
    """A handler's answer sent as it is (not msgpack-encoded)."""

    content: bytes
    media_type: str = "application/octet-stream"


@dataclass(frozen=True)
class RawFile:
    """A handler's answer read from a file and sent in parts (never held in memory whole)."""

    path: str | os.PathLike[str]
    media_type: str = "application/octet-stream"


class BodyStream:
    """A raw request body as it arrives: ``async for chunk in body``. At most ``limit`` bytes (413 beyond);
    a pause longer than ``idle_s`` between parts answers 408."""

    def __init__(self, receive: Any, limit: int, idle_s: float) -> None:
        self._receive = receive
        self.limit = limit
        self.idle_s = idle_s
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        more = True
        while more:
            message = await _receive_within(self._receive, self.idle_s)
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self.limit:
                raise exc.RequestSizeError(f"Request body over the {self.limit} byte limit.")
            more = message.get("more_body", False)
            if chunk:
                yield chunk


@dataclass
class Route:
    """One route. The handler's parameters: the path's ``{names}``, ``b`` (the validated body, when ``body``
    is set), for ``raw_body`` either ``body`` (a :class:`BodyStream`) or ``data`` (the body's bytes), and
    query parameters (the rest, by type; ``Annotated[int, Field(ge=.., le=..)]`` bounds one).

    ``max_body``: the body's cap; by default the model's ``max_body`` class variable, else
    ``DEFAULT_MAX_BODY``."""

    method: str
    path: str
    access: Access
    handler: Callable[..., Awaitable[Any]]
    body: type[BaseModel] | None = None
    raw_body: bool = False
    max_body: int | None = None
    websocket: bool = False  # also served as a WebSocket: each message a body, each reply {"ok": answer}
    segments: tuple[str, ...] = field(init=False)
    wants_who: bool = field(init=False)  # the handler takes the caller's Identity as ``who``
    # query parameter name -> (type, default, or inspect.Parameter.empty when required)
    query: dict[str, tuple[Any, Any]] = field(init=False)
    # query parameter name -> (lowest, highest) accepted value, for numbers
    bounds: dict[str, tuple[float | None, float | None]] = field(init=False)
    streams: bool = field(init=False)  # a raw body handed over as a BodyStream (``body`` parameter)

    def __post_init__(self) -> None:
        self.segments = tuple(self.path.split("/"))
        names = {s[1:-1] for s in self.segments if s.startswith("{")}
        hints = typing.get_type_hints(self.handler)
        self.query = {}
        self.wants_who = "who" in inspect.signature(self.handler).parameters
        for name, p in inspect.signature(self.handler).parameters.items():
            if name in names or name in ("b", "data", "who", "body"):
                continue
            self.query[name] = (hints.get(name, str), p.default)
        self.streams = self.raw_body and "body" in inspect.signature(self.handler).parameters
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
            elif _scalar(typ) is int:
                self.bounds[name] = (-INT64_MAX - 1, INT64_MAX)  # what the database's integers hold

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        found: dict[str, str] = {}
        for want, got in zip(self.segments, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                found[want[1:-1]] = got
            elif want != got:
                return None
        return found


def _scalar(typ: Any) -> Any:
    """``X`` of ``X | None``."""
    args = typing.get_args(typ)
    if args and type(None) in args:
        return next(a for a in args if a is not type(None))
    return typ


def _declared_bounds(hint: Any) -> tuple[float | None, float | None] | None:
    """The (lowest, highest) a parameter's ``Annotated[..., Field(ge=.., le=..)]`` declares, if any."""
    hint = _scalar(hint)
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


def validate(raw: bytes | bytearray | memoryview, model: type[M]) -> M:
    """A msgpack body into its model; an empty body is ``{}``. 400 for malformed msgpack (also one nested
    too deep or declaring more than it holds) and for values the model refuses, naming the fields."""
    try:
        data = unpack(raw) if raw else {}
    except Exception as e:  # malformed msgpack: ExtraData, FormatError, StackError, ValueError, ...
        raise exc.InvalidError(
            f"Bad request body: not valid msgpack for this route ({type(e).__name__}: {short(str(e), 200)})."
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise exc.InvalidError(f"Bad request body: {describe(e)}") from None


_STATUS = {
    exc.InvalidError: 400,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
    exc.PermissionDeniedError: 403,
    exc.AuthError: 401,
    exc.RequestSizeError: 413,
    exc.NoProviderError: 422,
    exc.ResourceExhaustedError: 429,
}


def error_status(e: exc.Error) -> int:
    for cls in type(e).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


def _query_error(name: str, kind: str, msg: str, value: str) -> HTTPError:
    return HTTPError(
        422, [{"type": kind, "loc": ["query", name], "msg": msg, "input": value[:MAX_QUERY_STR]}]
    )


def _coerce(name: str, value: str, typ: Any, bounds: tuple[float | None, float | None] | None = None) -> Any:
    """A query string value as its parameter's type (FastAPI's rules for the scalar types used here), within
    its ``bounds``: numbers finite and in range, strings short and without control characters."""
    typ = _scalar(typ)
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


class Router:
    """The ASGI application serving a route table (HTTP and WebSocket), its lifespan, and the lazily built
    OpenAPI documentation.

    ``authenticate(header, client_host) -> Identity`` raises :class:`HTTPError` (401) for a missing or bad
    token. A handler with a ``who`` parameter is given the caller's :class:`Identity`. ``on_startup`` runs on the serving event loop before
    the first request.
    """

    def __init__(
        self,
        routes: list[Route],
        authenticate: Callable[[str, str | None], Identity],
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
        self._static: dict[tuple[str, str], Route] = {}
        self._templated: dict[tuple[str, int], list[Route]] = {}
        for r in routes:
            if "{" in r.path:
                self._templated.setdefault((r.method, len(r.segments)), []).append(r)
            else:
                self._static[(r.method, r.path)] = r

    # -- blocking work ------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the router's thread pool (database work, off the event loop)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="cp-db")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- routing ------------------------------------------------------------------------------------------
    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        r = self._static.get((method, path))
        if r is not None:
            return r, {}
        parts = path.split("/")
        for r in self._templated.get((method, len(parts)), ()):
            found = r.match(parts)
            if found is not None:
                # before anything looks them up: an id that cannot exist is not found, whoever asks
                for name, value in found.items():
                    problem = path_param_error(name, value)
                    if problem is not None:
                        raise HTTPError(404, problem)
                return r, found
        # 405 where another method has this path, as FastAPI answers
        for other in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if other == method:
                continue
            if (other, path) in self._static or any(
                x.match(parts) is not None for x in self._templated.get((other, len(parts)), ())
            ):
                raise HTTPError(405, "Method Not Allowed")
        raise HTTPError(404, "Not Found")

    def authorize(self, route: Route, scope: dict[str, Any], params: dict[str, str]) -> Identity | None:
        """The caller's identity (None on public routes); 401 without a valid token, 403 when the route's
        access level (:mod:`cloudmodal.server.security`) excludes it."""
        if route.access == "public":
            return None
        header = ""
        for k, v in scope["headers"]:
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        client = scope.get("client")
        who = self.authenticate(header, client[0] if client else None)
        denied = allows(route.access, who, params.get("worker_id"))
        if denied is not None:
            raise HTTPError(403, denied)
        return who

    def arguments(self, route: Route, scope: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(params)
        if route.query:
            given = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
            for name, (typ, default) in route.query.items():
                if name in given:
                    kwargs[name] = _coerce(name, given[name], typ, route.bounds.get(name))
                elif default is inspect.Parameter.empty:
                    raise HTTPError(
                        422,
                        [{"type": "missing", "loc": ["query", name], "msg": "Field required", "input": None}],
                    )
        return kwargs

    # -- ASGI ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] in DOC_PATHS:
                return await self.docs_app()(scope, receive, send)
            return await self._http(scope, receive, send)
        if kind == "websocket":
            return await self._websocket(scope, receive, send)
        if kind == "lifespan":
            return await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.on_startup is not None:
                        self.on_startup(asyncio.get_running_loop())
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            method = scope["method"]
            # HEAD is GET without the body (uvicorn leaves the body out), as health checkers expect
            route, params = self.find("GET" if method == "HEAD" else method, scope["path"])
            who = self.authorize(route, scope, params)
            kwargs = self.arguments(route, scope, params)
            if route.wants_who:
                kwargs["who"] = who
            held = 0  # bytes of the body budget this request holds until it is answered
            max_body = route.max_body
            assert max_body is not None  # Route.__post_init__ fills it in
            try:
                if route.streams:
                    _check_length(scope, max_body)
                    kwargs["body"] = BodyStream(receive, max_body, self.limits.body_timeout_s)
                elif route.body is not None or route.raw_body:
                    raw, held = await self._read_body(max_body, scope, receive)
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
                return await self._send_file(send, scope, result)
            if isinstance(result, Raw):
                await _send(send, 200, result.media_type, result.content)
            else:
                await _send(send, 200, MSGPACK, msgpack.packb(result, use_bin_type=True))
        except _ClientGone:
            return
        except HTTPError as e:
            await _send(
                send, e.status, "application/json", json.dumps({"detail": e.detail}).encode(), e.headers
            )
        except exc.Error as e:
            payload = {"error": {"type": type(e).__name__, "message": str(e)}}
            await _send(send, error_status(e), "application/json", json.dumps(payload).encode())
        except Exception as e:
            status, payload = _unexpected(e, scope)
            await _send(send, status, "application/json", json.dumps(payload).encode())

    async def _read_body(
        self, limit: int, scope: dict[str, Any], receive: Any
    ) -> tuple[bytes | bytearray, int]:
        """The request's body, at most ``limit`` bytes, and the bytes of the body budget it took (the caller
        gives them back). One buffer, sized from Content-Length where there is one; the whole body in one
        message (small bodies) is used as it comes."""
        declared = _check_length(scope, limit)
        held = 0
        try:
            if declared is not None and declared > SMALL_BODY:
                await self._take(declared)
                held = declared
            buf: bytearray | None = None
            size = 0
            more = True
            while more:
                message = await _receive_within(receive, self.limits.body_timeout_s)
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                if buf is None and not more:
                    if len(chunk) > limit:
                        raise exc.RequestSizeError(f"Request body over the {limit} byte limit.")
                    return chunk, held
                end = size + len(chunk)
                if end > limit:
                    raise exc.RequestSizeError(f"Request body over the {limit} byte limit.")
                if end > held and end > SMALL_BODY:  # a chunked body growing: take its share as it grows
                    step = min(max(end, 2 * held), limit) - held
                    await self._take(step, held)
                    held += step
                if buf is None:
                    buf = bytearray(declared) if declared is not None else bytearray()
                if declared is not None:
                    buf[size:end] = chunk
                else:
                    buf += chunk
                size = end
            return (buf if buf is not None else b""), held
        except BaseException:
            if held:
                self.budget.give(held)
            raise

    async def _take(self, n: int, own: int = 0) -> None:
        try:
            await self.budget.take(n, own)
        except TimeoutError:
            raise HTTPError(
                503,
                "The control plane is receiving too many large request bodies at once; retry in a moment.",
                [(b"retry-after", b"1")],
            ) from None

    async def _send_file(self, send: Any, scope: dict[str, Any], result: RawFile) -> None:
        f = await self.run(open, result.path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", result.media_type.encode()),
                        (b"content-length", str(size).encode()),
                    ],
                }
            )
            sent = 0
            while sent < size and scope["method"] != "HEAD":
                chunk = await self.run(f.read, min(FILE_CHUNK, size - sent))
                if not chunk:
                    raise RuntimeError(f"{result.path} shrank while it was being sent")
                sent += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": sent < size})
            if sent == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            f.close()

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A route with ``websocket=True`` (:class:`cloudmodal.client.transport.Channel`): each message a
        request body, each reply ``{"ok": answer}`` or the error a ``POST`` would have answered."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            route, params = self.find("POST", scope["path"])
            if not route.websocket:
                raise HTTPError(404, "Not Found")
            who = self.authorize(route, scope, params)
        except HTTPError as e:
            detail = json.dumps({"detail": e.detail}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": e.status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": detail})
            return
        assert route.body is not None
        await send({"type": "websocket.accept"})
        loop = asyncio.get_running_loop()
        recheck_at = loop.time() + WS_RECHECK_S
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            raw = message.get("bytes")
            if raw is None:
                raw = (message.get("text") or "").encode()
            reply: dict[str, Any]
            try:
                # the token is checked again at least every WS_RECHECK_S, so revoking it, or the worker it
                # belongs to stopping, ends an open socket's access within seconds as it ends a request's
                if loop.time() >= recheck_at:
                    who = self.authorize(route, scope, params)
                    recheck_at = loop.time() + WS_RECHECK_S
                extra = {"who": who} if route.wants_who else {}
                assert route.max_body is not None
                if len(raw) > route.max_body:
                    raise exc.RequestSizeError(
                        f"Message of {len(raw)} bytes is over the {route.max_body} byte limit."
                    )
                reply = {"ok": await route.handler(**params, **extra, b=validate(raw, route.body))}
            except HTTPError as e:
                reply = {"status": e.status, "detail": e.detail}
                if e.status in (401, 403):
                    await send({"type": "websocket.send", "bytes": msgpack.packb(reply, use_bin_type=True)})
                    await send({"type": "websocket.close", "code": 1008})
                    return
            except exc.Error as e:
                reply = {"status": error_status(e), "error": {"type": type(e).__name__, "message": str(e)}}
            except Exception as e:
                status, payload = _unexpected(e, scope)
                reply = {"status": status, **payload}
            await send({"type": "websocket.send", "bytes": msgpack.packb(reply, use_bin_type=True)})

    # -- documentation ------------------------------------------------------------------------------------
    def docs_app(self) -> Any:
        """The FastAPI application documenting the table (``/openapi.json``, ``/docs``), built on first use."""
        if self._docs is None:
            self._docs = build_docs_app(self.routes, self.title)
        return self._docs


def _check_length(scope: dict[str, Any], limit: int) -> int | None:
    """The request's Content-Length (None when chunked); 413 before reading a body declared over ``limit``."""
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                raise HTTPError(400, "Content-Length is not a number.") from None
            if declared > limit:
                raise exc.RequestSizeError(
                    f"Request body of {declared} bytes is over the {limit} byte limit."
                )
            return declared
    return None


async def _receive_within(receive: Any, idle_s: float) -> dict[str, Any]:
    """The next part of a request body, or 408 (closing the connection) when none comes within ``idle_s``."""
    try:
        async with asyncio.timeout(idle_s):
            message = await receive()
    except TimeoutError:
        raise HTTPError(
            408,
            f"The request body stalled: nothing arrived for {idle_s:g} s.",
            [(b"connection", b"close")],
        ) from None
    if message["type"] == "http.disconnect":
        raise _ClientGone
    return message


def _unexpected(e: Exception, scope: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The answer to an exception no handler expected: 400 where the database refused a value of the request
    (validation should have caught it: logged as a warning), else 500 (a bug: logged with its traceback)."""
    dberr = sys.modules.get("sqlalchemy.exc")
    if dberr is not None and isinstance(e, dberr.DataError):
        log.warning("%s %s: the database refused a value: %s", scope.get("method"), scope.get("path"), e.orig)
        message = "A value in the request does not fit the database (out of range or not storable)."
        return 400, {"error": {"type": "InvalidError", "message": message}}
    log.exception("%s %s failed", scope.get("method"), scope.get("path"))
    return 500, {"detail": "Internal Server Error"}


async def _send(
    send: Any, status: int, content_type: str, data: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(data)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def build_docs_app(routes: list[Route], title: str) -> Any:
    """A FastAPI application whose OpenAPI schema documents ``routes``: path and query parameters from each
    handler's signature, msgpack request bodies from its model, bearer authentication where required. Its
    endpoints are never called: :class:`Router` serves the routes."""
    from fastapi import Depends, FastAPI, Path, Query
    from fastapi.security import HTTPBearer

    from cloudmodal.server.limits import BLOB_ID_PATTERN, ID_PATTERN

    app = FastAPI(title=title, version="1", docs_url="/docs", redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="`cloudmodal server token`")
    for r in routes:
        hints = typing.get_type_hints(r.handler)
        params = []
        for name in (s[1:-1] for s in r.segments if s.startswith("{")):
            pattern = BLOB_ID_PATTERN if name == "blob_id" else ID_PATTERN
            annotation: Any = typing.Annotated[hints.get(name, str), Path(pattern=pattern)]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
        for name, (typ, default) in r.query.items():
            low, high = r.bounds.get(name, (None, None))
            if _scalar(typ) is str:
                query = Query(max_length=MAX_QUERY_STR, pattern=r"^[^\x00-\x1f\x7f]*$")
            else:
                query = (
                    Query(ge=low, le=high, allow_inf_nan=False)
                    if _scalar(typ) is float
                    else Query(ge=low, le=high)
                )
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=typing.Annotated[typ, query],
                )
            )

        async def endpoint(**_: Any) -> None:
            raise RuntimeError("served by cloudmodal.server.router.Router")

        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        endpoint.__name__ = r.handler.__name__
        endpoint.__doc__ = r.handler.__doc__
        extra: dict[str, Any] = {}
        if r.body is not None:
            schema = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            extra["requestBody"] = {"content": {MSGPACK: {"schema": schema}}, "required": True}
        elif r.raw_body:
            extra["requestBody"] = {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                "required": True,
            }
        if r.websocket:
            extra["x-websocket"] = "also served as a WebSocket: each binary message a body, each reply {ok}"
        app.add_api_route(
            r.path,
            endpoint,
            methods=[r.method],
            openapi_extra=extra or None,
            dependencies=[] if r.access == "public" else [Depends(bearer)],
            response_class=_response_class(),
            description=(inspect.getdoc(r.handler) or "") + f"\n\nAccess: {r.access}.",
        )
    return app


@functools.cache
def _response_class() -> Any:
    from fastapi.responses import Response

    class MsgpackResponse(Response):
        media_type = MSGPACK

    return MsgpackResponse
