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
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgpack
from pydantic import BaseModel, ValidationError

from cloudmodal import exception as exc

log = logging.getLogger("cloudmodal.server")

MSGPACK = "application/msgpack"
MAX_BODY = 1 << 30
DOC_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect")
M = TypeVar("M", bound=BaseModel)

# Who may call a route: anyone; any valid token (or anonymous loopback where allowed); admin tokens only;
# the worker named in the path (its own token) or admin.
Access = typing.Literal["public", "any", "admin", "worker"]


class HTTPError(Exception):
    """An error answered as ``{"detail": ...}`` with its status (authentication, routing, query parameters)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Raw:
    """A handler's answer sent as it is (not msgpack-encoded)."""

    content: bytes
    media_type: str = "application/octet-stream"


@dataclass
class Route:
    """One route. The handler's parameters: the path's ``{names}``, ``b`` (the validated body, when ``body``
    is set), ``data`` (the raw body bytes, when ``raw_body``), and query parameters (the rest, by type)."""

    method: str
    path: str
    access: Access
    handler: Callable[..., Awaitable[Any]]
    body: type[BaseModel] | None = None
    raw_body: bool = False
    max_body: int = MAX_BODY
    websocket: bool = False  # also served as a WebSocket: each message a body, each reply {"ok": answer}
    segments: tuple[str, ...] = field(init=False)
    # query parameter name -> (type, default, or inspect.Parameter.empty when required)
    query: dict[str, tuple[Any, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.segments = tuple(self.path.split("/"))
        names = {s[1:-1] for s in self.segments if s.startswith("{")}
        hints = typing.get_type_hints(self.handler)
        self.query = {}
        for name, p in inspect.signature(self.handler).parameters.items():
            if name in names or name in ("b", "data"):
                continue
            self.query[name] = (hints.get(name, str), p.default)

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


def validate(raw: bytes, model: type[M]) -> M:
    """A msgpack body into its model; an empty body is ``{}``."""
    try:
        data = msgpack.unpackb(raw, raw=False) if raw else {}
        return model.model_validate(data)
    except ValidationError as e:
        raise exc.InvalidError(f"Bad request body: {e.errors()[:3]}") from None
    except Exception as e:  # malformed msgpack
        raise exc.InvalidError(f"Bad request body: {e}") from None


_STATUS = {
    exc.InvalidError: 400,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
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


def _coerce(name: str, value: str, typ: Any) -> Any:
    """A query string value as its parameter's type (FastAPI's rules for the scalar types used here)."""
    args = typing.get_args(typ)
    if args and type(None) in args:  # X | None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            v = value.lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError(value)
        if typ in (int, float):
            return typ(value)
        return value
    except ValueError:
        raise HTTPError(
            422,
            [
                {
                    "type": f"{getattr(typ, '__name__', typ)}_parsing",
                    "loc": ["query", name],
                    "msg": f"Input should be a valid {getattr(typ, '__name__', typ)}",
                    "input": value,
                }
            ],
        ) from None


class Router:
    """The ASGI application serving a route table (HTTP and WebSocket), its lifespan, and the lazily built
    OpenAPI documentation.

    ``authenticate(header, client_host) -> scope`` raises :class:`HTTPError` (401) for a missing or bad
    token; a scope is ``"admin"`` or ``"worker:<id>"``. ``on_startup`` runs on the serving event loop before
    the first request.
    """

    def __init__(
        self,
        routes: list[Route],
        authenticate: Callable[[str, str | None], str],
        *,
        title: str = "API",
        on_startup: Callable[[asyncio.AbstractEventLoop], None] | None = None,
        threads: int = 40,
    ) -> None:
        self.routes = routes
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

    def authorize(self, route: Route, scope: dict[str, Any], params: dict[str, str]) -> None:
        if route.access == "public":
            return
        header = ""
        for k, v in scope["headers"]:
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        client = scope.get("client")
        granted = self.authenticate(header, client[0] if client else None)
        if route.access == "admin" and granted != "admin":
            raise HTTPError(403, "This token may only be used by its worker.")
        if route.access == "worker" and granted != "admin" and granted != f"worker:{params['worker_id']}":
            raise HTTPError(403, "This token belongs to another worker.")

    def arguments(self, route: Route, scope: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(params)
        if route.query:
            given = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
            for name, (typ, default) in route.query.items():
                if name in given:
                    kwargs[name] = _coerce(name, given[name], typ)
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
            self.authorize(route, scope, params)
            kwargs = self.arguments(route, scope, params)
            if route.body is not None or route.raw_body:
                for k, v in scope["headers"]:
                    if k == b"content-length" and int(v or 0) > route.max_body:
                        raise exc.RequestSizeError(
                            f"Request body of {int(v)} bytes is over the {route.max_body} byte limit."
                        )
                raw = await _read_body(receive, route.max_body)
                if raw is None:
                    return  # the client went away
                if route.body is not None:
                    kwargs["b"] = validate(raw, route.body)
                else:
                    kwargs["data"] = raw
            result = await route.handler(**kwargs)
            if isinstance(result, Raw):
                await _send(send, 200, result.media_type, result.content)
            else:
                await _send(send, 200, MSGPACK, msgpack.packb(result, use_bin_type=True))
        except HTTPError as e:
            await _send(send, e.status, "application/json", json.dumps({"detail": e.detail}).encode())
        except exc.Error as e:
            payload = {"error": {"type": type(e).__name__, "message": str(e)}}
            await _send(send, error_status(e), "application/json", json.dumps(payload).encode())
        except Exception:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await _send(send, 500, "application/json", b'{"detail": "Internal Server Error"}')

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
            self.authorize(route, scope, params)
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
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            raw = message.get("bytes")
            if raw is None:
                raw = (message.get("text") or "").encode()
            reply: dict[str, Any]
            try:
                reply = {"ok": await route.handler(**params, b=validate(raw, route.body))}
            except HTTPError as e:
                reply = {"status": e.status, "detail": e.detail}
            except exc.Error as e:
                reply = {"status": error_status(e), "error": {"type": type(e).__name__, "message": str(e)}}
            await send({"type": "websocket.send", "bytes": msgpack.packb(reply, use_bin_type=True)})

    # -- documentation ------------------------------------------------------------------------------------
    def docs_app(self) -> Any:
        """The FastAPI application documenting the table (``/openapi.json``, ``/docs``), built on first use."""
        if self._docs is None:
            self._docs = build_docs_app(self.routes, self.title)
        return self._docs


async def _read_body(receive: Any, limit: int) -> bytes | None:
    chunks = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise exc.RequestSizeError(f"Request body over the {limit} byte limit.")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _send(send: Any, status: int, content_type: str, data: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def build_docs_app(routes: list[Route], title: str) -> Any:
    """A FastAPI application whose OpenAPI schema documents ``routes``: path and query parameters from each
    handler's signature, msgpack request bodies from its model, bearer authentication where required. Its
    endpoints are never called: :class:`Router` serves the routes."""
    from fastapi import Depends, FastAPI
    from fastapi.security import HTTPBearer

    app = FastAPI(title=title, version="1", docs_url="/docs", redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="`cloudmodal server token`")
    for r in routes:
        hints = typing.get_type_hints(r.handler)
        params = []
        for name in (s[1:-1] for s in r.segments if s.startswith("{")):
            params.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(name, str))
            )
        for name, (typ, default) in r.query.items():
            params.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ)
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
