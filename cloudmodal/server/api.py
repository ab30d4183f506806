"""HTTP API of the control plane: the route table. Bodies are msgpack (binary payloads travel as raw bytes,
never base64); request models are pydantic, and the OpenAPI schema at ``/openapi.json`` documents every route
(see :mod:`cloudmodal.server.router`, which serves the table)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pydantic import BaseModel, Field

from cloudmodal.server.auth import is_loopback
from cloudmodal.server.blobs import MAX_BLOB_SIZE
from cloudmodal.server.queue import OutputItem
from cloudmodal.server.router import Access, HTTPError, Raw, Route, Router
from cloudmodal.server.service import ControlPlane, OutputMailbox, ParkedClaim

MAX_CLAIM = 1000
MAX_LONG_POLL_S = 50.0
GONE = ("draining", "stopped")  # worker states that get no more inputs


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


def build_asgi(cp: ControlPlane) -> Router:
    """The ASGI application to serve: :func:`build_routes` behind a :class:`Router`."""
    return build_routes(cp)


def build_routes(cp: ControlPlane) -> Router:
    def authenticate(header: str, client: str | None) -> str:
        """The scope a request may act in: its bearer token's, or admin for anonymous loopback where the
        server allows it."""
        if header.lower().startswith("bearer "):
            scope = cp.tokens.scope_of(header[7:].strip())
            if scope is None:
                raise HTTPError(401, "Invalid or revoked token.")
            return scope
        if cp.settings.allow_loopback_anonymous and is_loopback(client):
            return "admin"
        raise HTTPError(
            401,
            "Authentication required: send `Authorization: Bearer <token>` (see `cloudmodal server token`).",
        )

    routes: list[Route] = []

    def route(method: str, path: str, access: Access, **kw: Any) -> Any:
        def add(fn: Any) -> Any:
            routes.append(Route(method, path, access, fn, **kw))
            return fn

        return add

    async def run(fn: Any, *args: Any) -> Any:
        return await router.run(fn, *args)

    SHORT_ROWS = 16

    async def short(fn: Any, *args: Any, rows: int = 1) -> Any:
        """A short database operation on the hot path (a few ``rows``): inline on the event loop while SQLite
        has no write in progress (a thread hop costs more than the statement), else in the thread pool."""
        if rows <= SHORT_ROWS and cp.db.write_idle():
            return fn(*args)
        return await run(fn, *args)

    @route("GET", "/healthz", "public")
    async def healthz() -> Raw:
        """Liveness: ``{"ok": true, "time": ..., "reconciling": ...}`` (JSON). ``reconciling``: whether this
        control plane is the one that scales its database's pools (false: a standby serving the API)."""
        rec = cp.reconciler
        body = {
            "ok": True,
            "time": time.time(),
            "reconciling": rec.leadership.holding if rec is not None else None,
        }
        return Raw(json.dumps(body).encode(), "application/json")

    # -- apps --------------------------------------------------------------------------------------------
    @route("POST", "/v1/apps", "admin", body=AppCreate)
    async def create_app(b: AppCreate) -> Any:
        return await run(cp.create_app, b.app_id, b.name, b.ephemeral, b.description)

    @route("GET", "/v1/apps", "admin")
    async def list_apps(all: bool = True, limit: int = 100) -> Any:
        return await run(cp.list_apps, all, limit)

    @route("GET", "/v1/apps/{name_or_id}", "admin")
    async def get_app(name_or_id: str) -> Any:
        return await run(cp.find_app, name_or_id)

    @route("POST", "/v1/apps/{app_id}/heartbeat", "admin")
    async def app_heartbeat(app_id: str) -> Any:
        return {"state": await run(cp.app_heartbeat, app_id)}

    @route("POST", "/v1/apps/{app_id}/stop", "admin")
    async def stop_app(app_id: str) -> Any:
        a = await run(cp.find_app, app_id)
        await run(cp.stop_app, a["id"])
        return {"stopped": a["id"]}

    @route("POST", "/v1/apps/{app_id}/deployments", "admin", body=DeployRecord)
    async def record_deployment(app_id: str, b: DeployRecord) -> Any:
        return {"version": await run(cp.record_deployment, app_id, b.functions)}

    @route("GET", "/v1/apps/{name_or_id}/history", "admin")
    async def history(name_or_id: str) -> Any:
        return await run(cp.history, name_or_id)

    @route("GET", "/v1/apps/{app_id}/logs", "admin")
    async def app_logs(app_id: str, after: int = 0, timeout: float = 0.0, limit: int = 1000) -> Any:
        key = f"logs:{app_id}"
        ev = cp.hub.watch(key)
        try:
            rows = await run(cp.logs, app_id, after, limit)
            if not rows and timeout > 0 and not cp.hub.closing:
                try:
                    await asyncio.wait_for(ev.wait(), min(timeout, MAX_LONG_POLL_S))
                except TimeoutError:
                    pass
                rows = await run(cp.logs, app_id, after, limit)
        finally:
            cp.hub.unwatch(key, ev)
        return rows

    @route("GET", "/v1/apps/{app_id}/events", "admin")
    async def app_events(app_id: str, after: int = 0, limit: int = 500) -> Any:
        a = await run(cp.find_app, app_id)
        return await run(cp.events, a["id"], after, limit)

    # -- functions ---------------------------------------------------------------------------------------
    @route("POST", "/v1/functions", "any", body=FunctionCreate)
    async def create_function(b: FunctionCreate) -> Any:
        return await run(cp.create_function, b.model_dump())

    @route("GET", "/v1/functions/lookup", "any")
    async def lookup_function(name: str, app_name: str | None = None, app_id: str | None = None) -> Any:
        return await run(cp.lookup_function, app_name, name, app_id)

    @route("GET", "/v1/functions/{function_id}", "any")
    async def get_function(function_id: str) -> Any:
        return await run(cp.function_row, function_id)

    # -- calls -------------------------------------------------------------------------------------------
    async def _outputs(call_id: str, after: int, limit: int, timeout: float) -> list[Any]:
        key = f"outputs:{call_id}"
        ev = cp.hub.watch(key)
        try:
            deadline = time.monotonic() + min(max(timeout, 0.0), MAX_LONG_POLL_S)
            while True:
                rows = await run(cp.queue.fetch_outputs, call_id, after, min(limit, 10000))
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0 or cp.hub.closing:
                    return [list(r) for r in rows]
                ev.clear()
                try:
                    # also re-read now and then: another control-plane process may have written
                    await asyncio.wait_for(ev.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
        finally:
            cp.hub.unwatch(key, ev)

    @route("POST", "/v1/calls", "any", body=CallCreate, websocket=True)
    async def create_call(b: CallCreate) -> dict[str, Any]:
        """Create a call with its inputs; with ``wait`` and one input, also its answer (``.remote()``)."""
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
                if remaining <= 0 or cp.hub.closing:
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

    @route("POST", "/v1/calls/{call_id}/inputs", "any", body=InputsPut)
    async def put_inputs(call_id: str, b: InputsPut) -> Any:
        return {"accepted": await run(cp.put_inputs, call_id, b.function_id, b.inputs)}

    @route("POST", "/v1/calls/{call_id}/outputs", "any", body=OutputsGet)
    async def get_outputs(call_id: str, b: OutputsGet) -> Any:
        if b.after == 0:
            await run(cp.call_row, call_id)  # 404 for unknown calls instead of a silent wait
        return {"outputs": await _outputs(call_id, b.after, b.limit, b.timeout)}

    @route("GET", "/v1/calls/{call_id}", "any")
    async def get_call(call_id: str) -> Any:
        row = await run(cp.call_row, call_id)
        total, done = await run(cp.queue.call_progress, call_id)
        return row | {"total": total, "done": done}

    @route("POST", "/v1/calls/{call_id}/cancel", "any")
    async def cancel_call(call_id: str) -> Any:
        await run(cp.call_row, call_id)
        await run(cp.cancel_call, call_id)
        return {"cancelled": call_id}

    # -- blobs -------------------------------------------------------------------------------------------
    @route("POST", "/v1/blobs", "any", raw_body=True, max_body=MAX_BLOB_SIZE)
    async def put_blob(data: bytes) -> Any:
        return {"blob_id": await run(cp.blobs.put, data)}

    @route("GET", "/v1/blobs/{blob_id}", "any")
    async def get_blob(blob_id: str) -> Raw:
        return Raw(await run(cp.blobs.get, blob_id))

    # -- workers -----------------------------------------------------------------------------------------
    @route("POST", "/v1/workers/{worker_id}/register", "worker", body=WorkerRegister)
    async def register(worker_id: str, b: WorkerRegister) -> Any:
        return await run(cp.register_worker, worker_id, b.pid, b.host)

    @route("POST", "/v1/workers/{worker_id}/ready", "worker")
    async def ready(worker_id: str) -> Any:
        await run(cp.worker_ready, worker_id)
        return {}

    def _output_items(rows: list[OutputTuple]) -> list[OutputItem]:
        return [OutputItem(i, s, d, bl, g, r) for i, s, d, bl, g, r in rows]

    @route("POST", "/v1/workers/{worker_id}/claim", "worker", body=Claim, websocket=True)
    async def claim(worker_id: str, b: Claim) -> dict[str, Any]:
        """Record finished inputs, then claim up to ``max`` inputs, long-polling up to ``wait`` seconds."""
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
                if rows or remaining <= 0 or dev.is_set() or cp.hub.closing:
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

    @route("POST", "/v1/workers/{worker_id}/outputs", "worker", body=OutputsPost)
    async def post_outputs(worker_id: str, b: OutputsPost) -> Any:
        await short(cp.post_outputs, worker_id, _output_items(b.outputs), rows=len(b.outputs))
        return {}

    @route("POST", "/v1/workers/{worker_id}/heartbeat", "worker", body=Heartbeat)
    async def heartbeat(worker_id: str, b: Heartbeat) -> Any:
        return await run(lambda: cp.heartbeat(worker_id, b.in_flight, b.idle, b.held, b.served, b.busy_s))

    @route("POST", "/v1/workers/{worker_id}/logs", "worker", body=LogsPost)
    async def worker_logs(worker_id: str, b: LogsPost) -> Any:
        await run(cp.add_logs, worker_id, [list(x) for x in b.lines])
        return {}

    @route("POST", "/v1/workers/{worker_id}/release", "worker", body=Release)
    async def release(worker_id: str, b: Release) -> Any:
        return {"requeued": await run(cp.release_inputs, worker_id, b.input_ids)}

    @route("POST", "/v1/workers/{worker_id}/stopped", "worker", body=Stopped)
    async def stopped(worker_id: str, b: Stopped) -> Any:
        await run(lambda: cp.worker_stopped(worker_id, b.reason, crashed=b.crashed))
        return {}

    @route("POST", "/v1/tokens", "admin")
    async def create_token() -> Any:
        return {"token": await run(cp.tokens.create, "admin", "cli")}

    router = Router(routes, authenticate, title="cloudmodal control plane", on_startup=cp.hub.bind)
    return router
