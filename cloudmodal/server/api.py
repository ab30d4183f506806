"""HTTP API of the control plane. Bodies are msgpack (binary payloads travel as raw bytes, never base64);
request models are pydantic, so the OpenAPI schema at ``/openapi.json`` documents every route."""

from __future__ import annotations

import asyncio
import contextlib
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
from cloudmodal.server.service import ControlPlane

MSGPACK = "application/msgpack"
MAX_CLAIM = 1000
MAX_LONG_POLL_S = 50.0
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


class Claim(BaseModel):
    max: int = 1
    wait: float = 0.0


class OutputsPost(BaseModel):
    # input_id, status, data, data_blob, gen_index, retryable
    outputs: list[tuple[int, str, bytes | None, str | None, int, bool]]


class Heartbeat(BaseModel):
    in_flight: int = 0
    idle: bool = False
    held: list[int] = Field(default_factory=list)  # input ids the worker holds: only their leases renew


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
    raw = await request.body()
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

    def auth(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            scope = cp.tokens.scope_of(header[7:].strip())
            if scope is None:
                raise HTTPException(401, "Invalid or revoked token.")
            return scope
        client = request.client.host if request.client else None
        if cp.settings.allow_loopback_anonymous and is_loopback(client):
            return "admin"
        raise HTTPException(
            401,
            "Authentication required: send `Authorization: Bearer <token>` (see `cloudmodal server token`).",
        )

    def admin(scope: str = Depends(auth)) -> str:
        if scope != "admin":
            raise HTTPException(403, "This token may only be used by its worker.")
        return scope

    def caller(scope: str = Depends(auth)) -> str:
        """Clients, and workers calling other functions (``f.remote()`` inside a function)."""
        return scope

    def worker_scope(worker_id: str, scope: str = Depends(auth)) -> str:
        if scope != "admin" and scope != f"worker:{worker_id}":
            raise HTTPException(403, "This token belongs to another worker.")
        return scope

    run = to_thread.run_sync

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

    @app.post("/v1/calls", openapi_extra=msgpack_body(CallCreate), dependencies=[Depends(caller)])
    async def create_call(request: Request) -> Response:
        b = await body(request, CallCreate)
        await run(cp.create_call, b.call_id, b.function_id, b.kind, b.inputs)
        out: dict[str, Any] = {"call_id": b.call_id}
        if b.wait > 0:
            out["outputs"] = await _outputs(b.call_id, 0, 10000, b.wait)
        return packed(out)

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

    @app.post(
        "/v1/workers/{worker_id}/claim",
        openapi_extra=msgpack_body(Claim),
        dependencies=[Depends(worker_scope)],
    )
    async def claim(worker_id: str, request: Request) -> Response:
        b = await body(request, Claim)
        w = await run(cp.worker_row, worker_id)
        if w["state"] in ("draining", "stopped"):
            return packed({"inputs": [], "drain": True})
        fid = w["function_id"]
        key = f"inputs:{fid}"
        drain_key = f"drain:{worker_id}"
        ev = cp.hub.watch(key)
        dev = cp.hub.watch(drain_key)
        cp.hub.watch(drain_key, ev)  # a drain also wakes the wait below
        try:
            deadline = time.monotonic() + min(max(b.wait, 0.0), MAX_LONG_POLL_S)
            while True:
                ev.clear()
                rows = await run(cp.claim, worker_id, fid, max(1, min(b.max, MAX_CLAIM)))
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0 or dev.is_set():
                    break
                try:
                    await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            cp.hub.unwatch(key, ev)
            cp.hub.unwatch(drain_key, ev)
            cp.hub.unwatch(drain_key, dev)
        return packed(
            {
                "inputs": [
                    [r.input_id, r.call_id, r.idx, r.method, r.args, r.args_blob, r.attempt] for r in rows
                ],
                "drain": dev.is_set(),
            }
        )

    @app.post(
        "/v1/workers/{worker_id}/outputs",
        openapi_extra=msgpack_body(OutputsPost),
        dependencies=[Depends(worker_scope)],
    )
    async def post_outputs(worker_id: str, request: Request) -> Response:
        b = await body(request, OutputsPost)
        items = [OutputItem(i, s, d, bl, g, r) for i, s, d, bl, g, r in b.outputs]
        await run(cp.post_outputs, worker_id, items)
        return packed({})

    @app.post(
        "/v1/workers/{worker_id}/heartbeat",
        openapi_extra=msgpack_body(Heartbeat),
        dependencies=[Depends(worker_scope)],
    )
    async def heartbeat(worker_id: str, request: Request) -> Response:
        b = await body(request, Heartbeat)
        return packed(await run(cp.heartbeat, worker_id, b.in_flight, b.idle, b.held))

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

    return app
