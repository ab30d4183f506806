"""HTTP API of the control plane. Bodies are msgpack (binary payloads travel as raw bytes, never base64);
request models are pydantic, so the OpenAPI schema at ``/openapi.json`` documents every route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgpack
from anyio import to_thread
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from cloudmodal import exception as exc
from cloudmodal.server.auth import is_loopback
from cloudmodal.server.blobs import MAX_BLOB_SIZE
from cloudmodal.server.queue import OutputItem
from cloudmodal.server.service import ControlPlane, OutputMailbox, ParkedClaim

MSGPACK = "application/msgpack"
MAX_CLAIM = 1000
MAX_LONG_POLL_S = 50.0
GONE = ("draining", "stopped")  # worker states that get no more inputs
M = TypeVar("M", bound=BaseModel)


# -- request models ------------------------------------------------------------------------------------
class AppCreate(BaseModel):
    app_id: str
    name: str
    ephemeral: bool = True
    description: str = ""


class FunctionCreate(BaseModel):
    app_id: str
    name: str
    spec: dict[str, Any]
    function_id: str | None = None
    parent_id: str | None = None
    module: str = ""
    source_name: str | None = None
    source_blob: str | None = None
    source_dir: str | None = None
    pickled_blob: str | None = None
    inline_env: dict[str, str] = Field(default_factory=dict)
    allow_cpu_fallback: bool = False
    cpu_fallback_note: str | None = None


InputTuple = tuple[int, str | None, bytes | None, str | None]  # idx, method, args, args_blob


class CallCreate(BaseModel):
    call_id: str
    function_id: str
    kind: str = "remote"
    inputs: list[InputTuple] = Field(default_factory=list)
    wait: float = 0.0  # with one input: long-poll its outputs in the same request


class InputsPut(BaseModel):
    function_id: str
    inputs: list[InputTuple]


class OutputsGet(BaseModel):
    after: int = 0
    limit: int = 5000
    timeout: float = 0.0


class DeployRecord(BaseModel):
    functions: list[str]


class WorkerRegister(BaseModel):
    pid: int | None = None
    host: str = ""


OutputTuple = tuple[
    int, str, bytes | None, str | None, int, bool
]  # input_id, status, data, blob, gen, retryable


class Claim(BaseModel):
    max: int = 1
    wait: float = 0.0
    outputs: list[OutputTuple] = Field(default_factory=list)  # finished inputs, recorded before claiming


class OutputsPost(BaseModel):
    outputs: list[OutputTuple]


class Heartbeat(BaseModel):
    in_flight: int = 0
    idle: bool = False
    held: list[int] = Field(default_factory=list)  # input ids the worker holds: only their leases renew
    served: int = 0  # inputs finished since the last heartbeat ...
    busy_s: float = 0.0  # ... and the seconds they ran (the autoscaler's service-time estimate)


class LogsPost(BaseModel):
    lines: list[tuple[float, str, str, str | None]]


class Release(BaseModel):
    input_ids: list[int]


class Stopped(BaseModel):
    reason: str = "exited"
    crashed: bool = False


# -- plumbing ------------------------------------------------------------------------------------------
def packed(obj: Any, status: int = 200) -> Response:
    return Response(content=msgpack.packb(obj, use_bin_type=True), media_type=MSGPACK, status_code=status)


async def body(request: Request, model: type[M]) -> M:
    return _validate(await request.body(), model)


def _validate(raw: bytes, model: type[M]) -> M:
    try:
        data = msgpack.unpackb(raw, raw=False) if raw else {}
        return model.model_validate(data)
    except ValidationError as e:
        raise exc.InvalidError(f"Bad request body: {e.errors()[:3]}") from None
    except Exception as e:  # malformed msgpack
        raise exc.InvalidError(f"Bad request body: {e}") from None


def msgpack_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "content": {
                MSGPACK: {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
            },
            "required": True,
        }
    }


_STATUS = {
    exc.InvalidError: 400,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
    exc.AuthError: 401,
    exc.RequestSizeError: 413,
    exc.NoProviderError: 422,
    exc.ResourceExhaustedError: 429,
}


def _error_status(e: exc.Error) -> int:
    for cls in type(e).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def build_app(cp: ControlPlane) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        cp.hub.bind(asyncio.get_running_loop())
        yield

    app = FastAPI(
        title="cloudmodal control plane", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )

    @app.exception_handler(exc.Error)
    async def _on_error(_: Request, e: exc.Error) -> Response:
        return JSONResponse(
            {"error": {"type": type(e).__name__, "message": str(e)}}, status_code=_error_status(e)
        )

    def authenticate(header: str, client: str | None) -> str:
        """The scope a request may act in: its bearer token's, or admin for anonymous loopback where the
        server allows it."""
        if header.lower().startswith("bearer "):
            scope = cp.tokens.scope_of(header[7:].strip())
            if scope is None:
                raise HTTPException(401, "Invalid or revoked token.")
            return scope
        if cp.settings.allow_loopback_anonymous and is_loopback(client):
            return "admin"
        raise HTTPException(
            401,
            "Authentication required: send `Authorization: Bearer <token>` (see `cloudmodal server token`).",
        )

    # async: FastAPI runs sync dependencies in a thread pool, a thread hop per request for a dict lookup
    async def auth(request: Request) -> str:
        return authenticate(
            request.headers.get("authorization", ""), request.client.host if request.client else None
        )

    async def admin(scope: str = Depends(auth)) -> str:
        if scope != "admin":
            raise HTTPException(403, "This token may only be used by its worker.")
        return scope

    async def caller(scope: str = Depends(auth)) -> str:
        """Clients, and workers calling other functions (``f.remote()`` inside a function)."""
        return scope

    def check_worker(worker_id: str, scope: str) -> None:
        if scope != "admin" and scope != f"worker:{worker_id}":
            raise HTTPException(403, "This token belongs to another worker.")

    async def worker_scope(worker_id: str, scope: str = Depends(auth)) -> str:
        check_worker(worker_id, scope)
        return scope

    run = to_thread.run_sync

    SHORT_ROWS = 16

    async def short(fn: Any, *args: Any, rows: int = 1) -> Any:
        """A short database operation on the hot path (a few ``rows``): inline on the event loop while SQLite
        has no write in progress (a thread hop costs more than the statement), else in the thread pool."""
        if rows <= SHORT_ROWS and cp.db.write_idle():
            return fn(*args)
        return await run(fn, *args)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "time": time.time()}

    # -- apps --------------------------------------------------------------------------------------------
    @app.post("/v1/apps", openapi_extra=msgpack_body(AppCreate), dependencies=[Depends(admin)])
    async def create_app(request: Request) -> Response:
        b = await body(request, AppCreate)
        return packed(await run(cp.create_app, b.app_id, b.name, b.ephemeral, b.description))

    @app.get("/v1/apps", dependencies=[Depends(admin)])
    async def list_apps(all: bool = True, limit: int = 100) -> Response:
        return packed(await run(cp.list_apps, all, limit))

    @app.get("/v1/apps/{name_or_id}", dependencies=[Depends(admin)])
    async def get_app(name_or_id: str) -> Response:
        return packed(await run(cp.find_app, name_or_id))

    @app.post("/v1/apps/{app_id}/heartbeat", dependencies=[Depends(admin)])
    async def app_heartbeat(app_id: str) -> Response:
        return packed({"state": await run(cp.app_heartbeat, app_id)})

    @app.post("/v1/apps/{app_id}/stop", dependencies=[Depends(admin)])
    async def stop_app(app_id: str) -> Response:
        a = await run(cp.find_app, app_id)
        await run(cp.stop_app, a["id"])
        return packed({"stopped": a["id"]})

    @app.post(
        "/v1/apps/{app_id}/deployments",
        openapi_extra=msgpack_body(DeployRecord),
        dependencies=[Depends(admin)],
    )
    async def record_deployment(app_id: str, request: Request) -> Response:
        b = await body(request, DeployRecord)
        return packed({"version": await run(cp.record_deployment, app_id, b.functions)})

    @app.get("/v1/apps/{name_or_id}/history", dependencies=[Depends(admin)])
    async def history(name_or_id: str) -> Response:
        return packed(await run(cp.history, name_or_id))

    @app.get("/v1/apps/{app_id}/logs", dependencies=[Depends(admin)])
    async def app_logs(app_id: str, after: int = 0, timeout: float = 0.0, limit: int = 1000) -> Response:
        key = f"logs:{app_id}"
        ev = cp.hub.watch(key)
        try:
            rows = await run(cp.logs, app_id, after, limit)
            if not rows and timeout > 0:
                try:
                    await asyncio.wait_for(ev.wait(), min(timeout, MAX_LONG_POLL_S))
                except TimeoutError:
                    pass
                rows = await run(cp.logs, app_id, after, limit)
        finally:
            cp.hub.unwatch(key, ev)
        return packed(rows)

    @app.get("/v1/apps/{app_id}/events", dependencies=[Depends(admin)])
    async def app_events(app_id: str, after: int = 0, limit: int = 500) -> Response:
        a = await run(cp.find_app, app_id)
        return packed(await run(cp.events, a["id"], after, limit))

    # -- functions ---------------------------------------------------------------------------------------
    @app.post("/v1/functions", openapi_extra=msgpack_body(FunctionCreate), dependencies=[Depends(caller)])
    async def create_function(request: Request) -> Response:
        b = await body(request, FunctionCreate)
        return packed(await run(cp.create_function, b.model_dump()))

    @app.get("/v1/functions/lookup", dependencies=[Depends(caller)])
    async def lookup_function(name: str, app_name: str | None = None, app_id: str | None = None) -> Response:
        return packed(await run(cp.lookup_function, app_name, name, app_id))

    @app.get("/v1/functions/{function_id}", dependencies=[Depends(caller)])
    async def get_function(function_id: str) -> Response:
        return packed(await run(cp.function_row, function_id))

    # -- calls -------------------------------------------------------------------------------------------
    async def _outputs(call_id: str, after: int, limit: int, timeout: float) -> list[Any]:
        key = f"outputs:{call_id}"
        ev = cp.hub.watch(key)
        try:
            deadline = time.monotonic() + min(max(timeout, 0.0), MAX_LONG_POLL_S)
            while True:
                rows = await run(cp.queue.fetch_outputs, call_id, after, min(limit, 10000))
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0:
                    return [list(r) for r in rows]
                ev.clear()
                try:
                    # also re-read now and then: another control-plane process may have written
                    await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            cp.hub.unwatch(key, ev)

    async def do_create_call(b: CallCreate) -> dict[str, Any]:
        if b.wait <= 0 or len(b.inputs) != 1:
            await short(cp.create_call, b.call_id, b.function_id, b.kind, b.inputs, rows=len(b.inputs))
            out: dict[str, Any] = {"call_id": b.call_id}
            if b.wait > 0:
                out["outputs"] = await _outputs(b.call_id, 0, 10000, b.wait)
            return out
        # One input, answer awaited (`.remote()`): the outputs are handed over as they commit.
        key = f"outputs:{b.call_id}"
        mb = OutputMailbox(b.call_id, asyncio.get_running_loop(), asyncio.Event())
        cp.open_mailbox(mb)
        cp.hub.watch(key, mb.wake)  # cancellations and crash errors notify without rows
        try:
            existed = await short(cp.create_call, b.call_id, b.function_id, b.kind, b.inputs)
            rows: list[Any] = []
            if existed:  # a re-sent request: its outputs may be written already
                rows = [list(r) for r in await run(cp.queue.fetch_outputs, b.call_id, 0, 10000)]
            deadline = time.monotonic() + min(b.wait, MAX_LONG_POLL_S)
            while not rows:
                if (final := mb.final()) is not None:
                    rows = final
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                mb.wake.clear()
                try:
                    await asyncio.wait_for(mb.wake.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
                if mb.final() is None:
                    # generator items, a notification without rows, or a periodic re-read (another
                    # control-plane process may have written): the database is the record
                    rows = [list(r) for r in await run(cp.queue.fetch_outputs, b.call_id, 0, 10000)]
        finally:
            cp.hub.unwatch(key, mb.wake)
            cp.close_mailbox(mb)
        return {"call_id": b.call_id, "outputs": rows}

    @app.post("/v1/calls", openapi_extra=msgpack_body(CallCreate), dependencies=[Depends(caller)])
    async def create_call(request: Request) -> Response:
        return packed(await do_create_call(await body(request, CallCreate)))

    @app.post(
        "/v1/calls/{call_id}/inputs", openapi_extra=msgpack_body(InputsPut), dependencies=[Depends(caller)]
    )
    async def put_inputs(call_id: str, request: Request) -> Response:
        b = await body(request, InputsPut)
        return packed({"accepted": await run(cp.put_inputs, call_id, b.function_id, b.inputs)})

    @app.post(
        "/v1/calls/{call_id}/outputs", openapi_extra=msgpack_body(OutputsGet), dependencies=[Depends(caller)]
    )
    async def get_outputs(call_id: str, request: Request) -> Response:
        b = await body(request, OutputsGet)
        if b.after == 0:
            await run(cp.call_row, call_id)  # 404 for unknown calls instead of a silent wait
        return packed({"outputs": await _outputs(call_id, b.after, b.limit, b.timeout)})

    @app.get("/v1/calls/{call_id}", dependencies=[Depends(caller)])
    async def get_call(call_id: str) -> Response:
        row = await run(cp.call_row, call_id)
        total, done = await run(cp.queue.call_progress, call_id)
        return packed(row | {"total": total, "done": done})

    @app.post("/v1/calls/{call_id}/cancel", dependencies=[Depends(caller)])
    async def cancel_call(call_id: str) -> Response:
        await run(cp.call_row, call_id)
        await run(cp.cancel_call, call_id)
        return packed({"cancelled": call_id})

    # -- blobs -------------------------------------------------------------------------------------------
    @app.post("/v1/blobs", dependencies=[Depends(auth)])
    async def put_blob(request: Request) -> Response:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BLOB_SIZE:
            raise exc.RequestSizeError(f"Blob of {size} bytes is over the {MAX_BLOB_SIZE} byte limit.")
        data = await request.body()
        if len(data) > MAX_BLOB_SIZE:
            raise exc.RequestSizeError(f"Blob of {len(data)} bytes is over the {MAX_BLOB_SIZE} byte limit.")
        return packed({"blob_id": await run(cp.blobs.put, data)})

    @app.get("/v1/blobs/{blob_id}", dependencies=[Depends(auth)])
    async def get_blob(blob_id: str) -> Response:
        return Response(content=await run(cp.blobs.get, blob_id), media_type="application/octet-stream")

    # -- workers -----------------------------------------------------------------------------------------
    @app.post(
        "/v1/workers/{worker_id}/register",
        openapi_extra=msgpack_body(WorkerRegister),
        dependencies=[Depends(worker_scope)],
    )
    async def register(worker_id: str, request: Request) -> Response:
        b = await body(request, WorkerRegister)
        return packed(await run(cp.register_worker, worker_id, b.pid, b.host))

    @app.post("/v1/workers/{worker_id}/ready", dependencies=[Depends(worker_scope)])
    async def ready(worker_id: str) -> Response:
        await run(cp.worker_ready, worker_id)
        return packed({})

    def _output_items(rows: list[OutputTuple]) -> list[OutputItem]:
        return [OutputItem(i, s, d, bl, g, r) for i, s, d, bl, g, r in rows]

    async def do_claim(worker_id: str, b: Claim) -> dict[str, Any]:
        if b.outputs:
            await short(cp.post_outputs, worker_id, _output_items(b.outputs), rows=len(b.outputs))
        fid, state = cp.worker_function(worker_id)
        if state in GONE:
            return {"inputs": [], "drain": True}
        max_n = max(1, min(b.max, MAX_CLAIM))
        key = f"inputs:{fid}"
        drain_key = f"drain:{worker_id}"
        ev = cp.hub.watch(key)
        dev = cp.hub.watch(drain_key)
        cp.hub.watch(drain_key, ev)  # a drain also wakes the wait below
        loop = asyncio.get_running_loop()
        rows: list[Any] = []
        try:
            deadline = time.monotonic() + min(max(b.wait, 0.0), MAX_LONG_POLL_S)
            look = cp.claim_may_find(fid)
            while not dev.is_set():
                ev.clear()
                if look:
                    rows = await short(cp.claim, worker_id, fid, max_n, rows=max_n)
                look = True
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0 or dev.is_set():
                    break
                if cp.worker_function(worker_id)[1] in GONE:
                    # stopped while this claim waited (its process died): never park for it again
                    dev.set()
                    break
                pc = ParkedClaim(worker_id, fid, max_n, loop, ev)
                cp.park(pc)
                try:
                    # also re-read now and then: inputs may be pending that nobody announced here
                    await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
                finally:
                    if not cp.unpark(pc):
                        await pc.done.wait()  # inputs were promised: they are being written
                if pc.rows:
                    rows = pc.rows
                    break
        finally:
            cp.hub.unwatch(key, ev)
            cp.hub.unwatch(drain_key, ev)
            cp.hub.unwatch(drain_key, dev)
        return {
            "inputs": [
                [r.input_id, r.call_id, r.idx, r.method, r.args, r.args_blob, r.attempt] for r in rows
            ],
            "drain": dev.is_set(),
        }

    @app.post(
        "/v1/workers/{worker_id}/claim",
        openapi_extra=msgpack_body(Claim),
        dependencies=[Depends(worker_scope)],
    )
    async def claim(worker_id: str, request: Request) -> Response:
        return packed(await do_claim(worker_id, await body(request, Claim)))

    @app.post(
        "/v1/workers/{worker_id}/outputs",
        openapi_extra=msgpack_body(OutputsPost),
        dependencies=[Depends(worker_scope)],
    )
    async def post_outputs(worker_id: str, request: Request) -> Response:
        return packed(await do_post_outputs(worker_id, await body(request, OutputsPost)))

    async def do_post_outputs(worker_id: str, b: OutputsPost) -> dict[str, Any]:
        await short(cp.post_outputs, worker_id, _output_items(b.outputs), rows=len(b.outputs))
        return {}

    @app.post(
        "/v1/workers/{worker_id}/heartbeat",
        openapi_extra=msgpack_body(Heartbeat),
        dependencies=[Depends(worker_scope)],
    )
    async def heartbeat(worker_id: str, request: Request) -> Response:
        b = await body(request, Heartbeat)
        return packed(
            await run(lambda: cp.heartbeat(worker_id, b.in_flight, b.idle, b.held, b.served, b.busy_s))
        )

    @app.post(
        "/v1/workers/{worker_id}/logs",
        openapi_extra=msgpack_body(LogsPost),
        dependencies=[Depends(worker_scope)],
    )
    async def worker_logs(worker_id: str, request: Request) -> Response:
        b = await body(request, LogsPost)
        await run(cp.add_logs, worker_id, [list(x) for x in b.lines])
        return packed({})

    @app.post(
        "/v1/workers/{worker_id}/release",
        openapi_extra=msgpack_body(Release),
        dependencies=[Depends(worker_scope)],
    )
    async def release(worker_id: str, request: Request) -> Response:
        b = await body(request, Release)
        return packed({"requeued": await run(cp.release_inputs, worker_id, b.input_ids)})

    @app.post(
        "/v1/workers/{worker_id}/stopped",
        openapi_extra=msgpack_body(Stopped),
        dependencies=[Depends(worker_scope)],
    )
    async def stopped(worker_id: str, request: Request) -> Response:
        b = await body(request, Stopped)
        await run(lambda: cp.worker_stopped(worker_id, b.reason, crashed=b.crashed))
        return packed({})

    @app.post("/v1/tokens", dependencies=[Depends(admin)])
    async def create_token() -> Response:
        return packed({"token": await run(cp.tokens.create, "admin", "cli")})

    app.state.hot_routes = HotRoutes(
        app,
        authenticate,
        check_worker,
        call=(CallCreate, do_create_call),
        claim=(Claim, do_claim),
        outputs=(OutputsPost, do_post_outputs),
    )
    return app


def build_asgi(cp: ControlPlane) -> Any:
    """The ASGI application to serve: the FastAPI app behind :class:`HotRoutes`."""
    return build_app(cp).state.hot_routes


class HotRoutes:
    """A lean ASGI front for the three routes on every call's path — create a call, a worker's claim, a
    worker's outputs — in front of the FastAPI app, which serves everything else.

    FastAPI's routing, dependency solving and middleware cost several times what these handlers do, and a
    warm ``.remote()`` crosses them twice. The routes stay declared on the FastAPI app (the OpenAPI schema
    documents them, and they run the same handler functions); this front only answers them first, with the
    same authentication, validation, status codes and error bodies.
    """

    MAX_BODY = 1 << 30

    def __init__(self, app: FastAPI, authenticate: Any, check_worker: Any, **routes: Any) -> None:
        self.app = app
        self.authenticate = authenticate
        self.check_worker = check_worker
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == "/v1/calls":
                return await self._serve_ws(scope, receive, send, "call", None)
            parts = scope["path"].split("/")
            if len(parts) == 5 and parts[:3] == ["", "v1", "workers"] and parts[4] == "claim" and parts[3]:
                return await self._serve_ws(scope, receive, send, parts[4], parts[3])
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path == "/v1/calls":
                return await self._serve(scope, receive, send, "call", None)
            if path.startswith("/v1/workers/"):
                parts = path.split("/")
                if len(parts) == 5 and parts[4] in ("claim", "outputs") and parts[3]:
                    return await self._serve(scope, receive, send, parts[4], parts[3])
        await self.app(scope, receive, send)

    def _authorize(self, scope: dict[str, Any], worker_id: str | None) -> None:
        """The FastAPI routes' ``caller`` / ``worker_scope`` checks, from the ASGI scope."""
        header = ""
        for k, v in scope["headers"]:
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        client = scope.get("client")
        granted = self.authenticate(header, client[0] if client else None)
        if worker_id is not None:
            self.check_worker(worker_id, granted)

    async def _serve(
        self, scope: dict[str, Any], receive: Any, send: Any, route: str, worker_id: str | None
    ) -> None:
        model, handler = self.routes[route]
        try:
            self._authorize(scope, worker_id)
            chunks = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.MAX_BODY:
                    raise exc.RequestSizeError(f"Request body over {self.MAX_BODY} bytes.")
                chunks.append(chunk)
                more = message.get("more_body", False)
            b = _validate(b"".join(chunks), model)
            result = await (handler(b) if worker_id is None else handler(worker_id, b))
            await _send(send, 200, MSGPACK, msgpack.packb(result, use_bin_type=True))
        except HTTPException as e:
            await _send(send, e.status_code, "application/json", json.dumps({"detail": e.detail}).encode())
        except exc.Error as e:
            payload = {"error": {"type": type(e).__name__, "message": str(e)}}
            await _send(send, _error_status(e), "application/json", json.dumps(payload).encode())

    async def _serve_ws(
        self, scope: dict[str, Any], receive: Any, send: Any, route: str, worker_id: str | None
    ) -> None:
        """The same route as a WebSocket (:class:`cloudmodal.client.transport.Channel`): each message a
        request body, each reply ``{"ok": answer}`` or the error a ``POST`` would have answered."""
        model, handler = self.routes[route]
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            self._authorize(scope, worker_id)
        except HTTPException as e:
            detail = json.dumps({"detail": e.detail}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": e.status_code,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": detail})
            return
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
                b = _validate(raw, model)
                reply = {"ok": await (handler(b) if worker_id is None else handler(worker_id, b))}
            except HTTPException as e:
                reply = {"status": e.status_code, "detail": e.detail}
            except exc.Error as e:
                reply = {"status": _error_status(e), "error": {"type": type(e).__name__, "message": str(e)}}
            await send({"type": "websocket.send", "bytes": msgpack.packb(reply, use_bin_type=True)})


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
