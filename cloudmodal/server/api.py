"""HTTP API of the control plane: the route table. Bodies are msgpack (binary payloads travel as raw bytes,
never base64); request models are pydantic, and the OpenAPI schema at ``/openapi.json`` documents every route
(see :mod:`cloudmodal.server.router`, which serves the table on Starlette)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from cloudmodal import exception as exc
from cloudmodal.server import models
from cloudmodal.server.auth import NOT_CACHED, is_loopback
from cloudmodal.server.blobs import INLINE_LIMIT, MAX_BLOB_SIZE, DirectoryBlobStore, iterate
from cloudmodal.server.http_body import BodyStream
from cloudmodal.server.http_errors import HTTPError
from cloudmodal.server.limits import (
    INT32_MAX,
    SMALL_BODY,
    AppName,
    BlobId,
    EnvName,
    EnvValue,
    FileName,
    Id,
    Int32,
    MethodName,
    ModulePath,
    Name,
    RowId,
    Seconds,
    ShortText,
    Text,
    Timestamp,
    bounded_depth,
)
from cloudmodal.server.queue import OutputItem
from cloudmodal.server.router import NeedsIO, Raw, RawFile, RawStream, Route, TableApp
from cloudmodal.server.security import Access, Identity, identity_for, member_scope
from cloudmodal.server.service import ControlPlane, OutputMailbox, ParkedClaim, WorkerOp, WorkerOpResult

MAX_CLAIM = 1000
MAX_LONG_POLL_S = 50.0
GONE = ("draining", "stopped")  # worker states that get no more inputs
ANONYMOUS_OWNER = Identity("owner", "anonymous", "owner")


# -- request models ------------------------------------------------------------------------------------
# Every field is bounded where it enters (see cloudmodal.server.limits): ids and names by pattern, integers by
# the database columns they land in, floats finite, lists and texts by length. ``max_body`` is each model's
# body cap; the router also bounds the bytes of all bodies in flight together.
MiB = 1024 * 1024
Spec = Annotated[dict[str, Any], bounded_depth()]  # its fields: the spec validator's


TagText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,63}$")]


class BudgetWire(BaseModel):
    """An app's ``cloudmodal.Budget``: USD an hour and USD a period, either or both."""

    max_per_hour: Annotated[float, Field(ge=0, le=1e9)] | None = None
    max_total: Annotated[float, Field(ge=0, le=1e12)] | None = None
    period: Literal["day", "week", "month"] = "month"


class AutoscalerUpdate(BaseModel):
    """``Function.update_autoscaler``: the settings to change (the others keep their values)."""

    max_body: ClassVar[int] = SMALL_BODY

    min_containers: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    max_containers: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    buffer_containers: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    scaledown_window: Annotated[int, Field(ge=2, le=3600)] | None = None


class AppCreate(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    app_id: Id
    name: AppName
    ephemeral: bool = True
    description: Text = ""
    tags: dict[TagText, TagText] | None = Field(default=None, max_length=64)
    budget: BudgetWire | None = None


class FunctionCreate(BaseModel):
    # inline_env alone may hold 256 values of 64 KiB
    max_body: ClassVar[int] = 24 * MiB

    app_id: Id
    name: Name
    spec: Spec
    function_id: Id | None = None
    parent_id: Id | None = None
    module: ModulePath = ""
    source_name: FileName | None = None  # written under the worker's source cache: a plain file name
    source_blob: BlobId | None = None
    source_dir: Text | None = None
    pickled_blob: BlobId | None = None
    inline_env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=256)
    # Secret.from_name(name, required_keys=[...]): checked on the server against the stored secret
    secret_required_keys: dict[Id, Annotated[list[EnvName], Field(max_length=256)]] = Field(
        default_factory=dict, max_length=256
    )
    allow_cpu_fallback: bool = False
    cpu_fallback_note: Text | None = None


InputIdx = Annotated[int, Field(ge=0, le=INT32_MAX)]
InlineBytes = Annotated[bytes, Field(max_length=INLINE_LIMIT)]  # larger payloads travel as blobs
# idx, method, args, args_blob
InputTuple = tuple[InputIdx, MethodName | None, InlineBytes | None, BlobId | None]
MAX_INPUTS = 10_000  # inputs per request (a map's batches hold up to 2,000)
# A map's input batch: up to MAP_BATCH_BYTES plus one inline input, with room for its framing.
INPUTS_BODY = 16 * MiB
CallKind = Literal["remote", "spawn", "map", "spawn_map"]


class CallCreate(BaseModel):
    max_body: ClassVar[int] = INPUTS_BODY

    call_id: Id
    function_id: Id
    kind: CallKind = "remote"
    inputs: list[InputTuple] = Field(default_factory=list, max_length=MAX_INPUTS)
    wait: Seconds = 0.0  # with one input: long-poll its outputs in the same request


class InputsPut(BaseModel):
    max_body: ClassVar[int] = INPUTS_BODY

    function_id: Id
    inputs: list[InputTuple] = Field(max_length=MAX_INPUTS)


class OutputsGet(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    after: RowId = 0
    limit: Annotated[int, Field(ge=1, le=10_000)] = 5000
    timeout: Seconds = 0.0


class DeployRecord(BaseModel):
    max_body: ClassVar[int] = MiB

    functions: list[Name] = Field(max_length=10_000)


class WorkerRegister(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    pid: Int32 | None = None
    host: ShortText = ""


OutputStatus = Literal["success", "failure", "timeout", "gen_item"]
GenIndex = Annotated[int, Field(ge=-1, le=INT32_MAX)]
OutputTuple = tuple[
    RowId, OutputStatus, InlineBytes | None, BlobId | None, GenIndex, bool
]  # input_id, status, data, blob, gen, retryable
MAX_OUTPUTS = 10_000
# A worker's outputs: each up to 2 MiB inline, several per request when inputs finish together.
OUTPUTS_BODY = 64 * MiB


class Claim(BaseModel):
    max_body: ClassVar[int] = OUTPUTS_BODY

    max: Int32 = 1
    wait: Seconds = 0.0
    # finished inputs, recorded before claiming
    outputs: list[OutputTuple] = Field(default_factory=list, max_length=MAX_OUTPUTS)


class OutputsPost(BaseModel):
    max_body: ClassVar[int] = OUTPUTS_BODY

    outputs: list[OutputTuple] = Field(max_length=MAX_OUTPUTS)


class Heartbeat(BaseModel):
    max_body: ClassVar[int] = 4 * MiB

    in_flight: Int32 = 0
    idle: bool = False
    # input ids the worker holds: only their leases renew
    held: list[RowId] = Field(default_factory=list, max_length=100_000)
    served: Int32 = 0  # inputs finished since the last heartbeat ...
    busy_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0  # ... and the seconds they ran


MAX_LOG_LINE = 64 * 1024


def _log_text(v: str) -> str:
    """A log line as stored: NUL (which PostgreSQL text cannot hold) shown as U+FFFD, and cut to
    MAX_LOG_LINE characters; a user's output is never refused for what it prints."""
    if "\x00" in v:
        v = v.replace("\x00", "\ufffd")
    if len(v) > MAX_LOG_LINE:
        v = v[:MAX_LOG_LINE] + f"... [{len(v) - MAX_LOG_LINE} more characters not kept]"
    return v


LogLine = tuple[Timestamp, Literal["stdout", "stderr"], Annotated[str, AfterValidator(_log_text)], Id | None]


class LogsPost(BaseModel):
    max_body: ClassVar[int] = OUTPUTS_BODY

    lines: list[LogLine] = Field(max_length=100_000)


class Release(BaseModel):
    max_body: ClassVar[int] = 4 * MiB

    input_ids: list[RowId] = Field(max_length=100_000)


class Preempting(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    at: Timestamp  # when the cloud will reclaim the node
    source: Text = ""  # where the notice came from ("aws": IMDS spot/instance-action, ...)


class TokenCreate(BaseModel):
    kind: Literal["owner", "member", "proxy"] = "member"
    apps: list[Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9._-]{1,64}$")]] | None = Field(
        default=None, max_length=100
    )
    name: str = Field(default="", max_length=200)


class Stopped(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    reason: Text = "exited"
    crashed: bool = False


def build_asgi(cp: ControlPlane) -> TableApp:
    """The ASGI application to serve: :func:`build_routes`' table on Starlette."""
    return build_routes(cp)


def build_routes(cp: ControlPlane) -> TableApp:
    def authenticate(header: str, client: str | None, may_block: bool) -> Identity:
        """The identity of the request's bearer token; anonymous loopback acts as the owner only where the
        server was explicitly started so (``--allow-anonymous-loopback``). Without ``may_block``, only from
        the token cache (:class:`NeedsIO` where the database must be read)."""
        if header[:7].lower() == "bearer ":
            who = cp.tokens.identify(header[7:].strip(), read=may_block)
            if who is NOT_CACHED:
                raise NeedsIO
            if who is None:
                raise HTTPError(401, "Invalid or revoked token.")
            return who
        if cp.settings.allow_loopback_anonymous and is_loopback(client):
            return ANONYMOUS_OWNER
        raise HTTPError(
            401,
            "Authentication required: send `Authorization: Bearer <token>`. On the control plane's machine the "
            "CLI reads the owner token from its state directory; `cloudmodal token create` makes tokens for others.",
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

    async def worker_op(op: WorkerOp, rows: int) -> WorkerOpResult:
        """A worker's request on an input's path (outputs, a claim, a heartbeat). PostgreSQL: written with the
        other workers' concurrent requests in one transaction (:mod:`.group_commit`). SQLite, one writer
        anyway: alone, as :func:`short` runs it."""
        if cp.db.is_sqlite:
            # a short op on the event loop: ``rows`` is its largest part (a claim and the outputs it carries
            # were two short writes before they were one)
            return (await short(cp.worker_ops, [op], rows=rows))[0]
        return await cp.commits.run(op)

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
    @route("POST", "/v1/apps", "member", body=AppCreate)
    async def create_app(b: AppCreate, who: Identity) -> Any:
        if not who.team_wide and (who.apps is None or b.name not in who.apps):
            raise exc.PermissionDeniedError(f"This token may not create app {b.name!r}.")
        budget = b.budget.model_dump() if b.budget is not None else None
        return await run(cp.apps.create_app, b.app_id, b.name, b.ephemeral, b.description, b.tags, budget)

    @route("GET", "/v1/apps", "member")
    async def list_apps(who: Identity, all: bool = True, limit: int = 100) -> Any:
        apps = await run(cp.apps.list_apps, all, limit)
        return apps if who.team_wide else [a for a in apps if a["name"] in (who.apps or ())]

    @route("GET", "/v1/apps/{name_or_id}", "member")
    async def get_app(name_or_id: str, who: Identity) -> Any:
        return await run(cp.access.check_app, who, name_or_id)

    @route("POST", "/v1/apps/{app_id}/heartbeat", "member")
    async def app_heartbeat(app_id: str, who: Identity) -> Any:
        a = await run(cp.access.check_app, who, app_id)
        return {"state": await run(cp.apps.app_heartbeat, a["id"])}

    @route("POST", "/v1/apps/{app_id}/stop", "member")
    async def stop_app(app_id: str, who: Identity) -> Any:
        a = await run(cp.access.check_app, who, app_id)
        await run(cp.apps.stop_app, a["id"])
        return {"stopped": a["id"]}

    @route("POST", "/v1/apps/{app_id}/deployments", "member", body=DeployRecord)
    async def record_deployment(app_id: str, b: DeployRecord, who: Identity) -> Any:
        a = await run(cp.access.check_app, who, app_id)
        return {"version": await run(cp.apps.record_deployment, a["id"], b.functions)}

    @route("GET", "/v1/apps/{name_or_id}/history", "member", response=list[models.Deployment])
    async def history(name_or_id: str, who: Identity) -> Any:
        a = await run(cp.access.check_app, who, name_or_id)
        return await run(cp.apps.history, a["id"])

    @route("GET", "/v1/apps/{app_id}/logs", "member", response=list[models.Log])
    async def app_logs(
        app_id: str, who: Identity, after: int = 0, timeout: float = 0.0, limit: int = 1000
    ) -> Any:
        app_id = (await run(cp.access.check_app, who, app_id))["id"]
        key = f"logs:{app_id}"
        ev = cp.hub.watch(key)
        try:
            rows = await run(cp.activity.logs, app_id, after, limit)
            if not rows and timeout > 0 and not cp.hub.closing:
                try:
                    await asyncio.wait_for(ev.wait(), min(timeout, MAX_LONG_POLL_S))
                except TimeoutError:
                    pass
                rows = await run(cp.activity.logs, app_id, after, limit)
        finally:
            cp.hub.unwatch(key, ev)
        return rows

    @route("GET", "/v1/apps/{app_id}/events", "member", response=list[models.Event])
    async def app_events(app_id: str, who: Identity, after: int = 0, limit: int = 500) -> Any:
        a = await run(cp.access.check_app, who, app_id)
        return await run(cp.activity.events, a["id"], after, limit)

    # -- functions ---------------------------------------------------------------------------------------
    @route("POST", "/v1/functions", "caller", body=FunctionCreate)
    async def create_function(b: FunctionCreate, who: Identity) -> Any:
        """Register a function (owner, member); a worker may only instantiate a class (``parent_id``)."""
        return await run(cp.functions.create_function, b.model_dump(), who)

    @route("GET", "/v1/functions/lookup", "caller")
    async def lookup_function(
        who: Identity, name: str, app_name: str | None = None, app_id: str | None = None
    ) -> Any:
        return await run(cp.functions.lookup_function, app_name, name, app_id, who)

    @route("GET", "/v1/functions/{function_id}", "caller")
    async def get_function(function_id: str, who: Identity) -> Any:
        return await run(cp.functions.function_view, who, function_id)

    @route("POST", "/v1/functions/{function_id}/autoscaler", "member", body=AutoscalerUpdate)
    async def update_autoscaler(function_id: str, b: AutoscalerUpdate, who: Identity) -> Any:
        """Change a function's autoscaler settings until its next registration (``Function.update_autoscaler``)."""
        return await run(cp.functions.update_autoscaler, who, function_id, b.model_dump(exclude_none=True))

    @route("GET", "/v1/functions/{function_id}/stats", "caller")
    async def function_stats(function_id: str, who: Identity) -> Any:
        """Inputs waiting and live workers of a function (``Function.get_current_stats``)."""
        return await run(cp.functions.current_stats, who, function_id)

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

    @route("POST", "/v1/calls", "caller", body=CallCreate, websocket=True)
    async def create_call(b: CallCreate, who: Identity) -> dict[str, Any]:
        """Create a call with its inputs; with ``wait`` and one input, also its answer (``.remote()``)."""
        if not who.team_wide:  # team-wide tokens call anything without a look-up (the warm path)
            await run(cp.access.check_callable, who, b.function_id)
        owner = who.kind == "owner"
        if b.wait <= 0 or len(b.inputs) != 1:
            await short(
                cp.calls.create_call,
                b.call_id,
                b.function_id,
                b.kind,
                b.inputs,
                who.principal,
                owner,
                rows=len(b.inputs),
            )
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
            existed = await short(
                cp.calls.create_call, b.call_id, b.function_id, b.kind, b.inputs, who.principal, owner
            )
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

    @route("POST", "/v1/calls/{call_id}/inputs", "caller", body=InputsPut)
    async def put_inputs(call_id: str, b: InputsPut, who: Identity) -> Any:
        """More inputs for a call: from the caller that created it."""
        creator = None if who.kind == "owner" else who.principal
        return {"accepted": await run(cp.put_inputs, call_id, b.function_id, b.inputs, creator)}

    @route("POST", "/v1/calls/{call_id}/outputs", "caller", body=OutputsGet)
    async def get_outputs(call_id: str, b: OutputsGet, who: Identity) -> Any:
        """A call's outputs after ``after``: for its creator and the team-wide tokens (404 for unknown calls
        instead of a silent wait)."""
        await short(cp.access.check_call, who, call_id)
        return {"outputs": await _outputs(call_id, b.after, b.limit, b.timeout)}

    @route("GET", "/v1/calls/{call_id}", "caller", response=models.Call)
    async def get_call(call_id: str, who: Identity) -> Any:
        await run(cp.access.check_call, who, call_id)
        row = await run(cp.calls.call_row, call_id)
        total, done = await run(cp.queue.call_progress, call_id)
        return row | {"total": total, "done": done}

    @route("POST", "/v1/calls/{call_id}/cancel", "caller")
    async def cancel_call(call_id: str, who: Identity) -> Any:
        await run(cp.access.check_call, who, call_id)
        await run(cp.calls.cancel_call, call_id)
        return {"cancelled": call_id}

    # -- blobs -------------------------------------------------------------------------------------------
    @route("POST", "/v1/blobs", "caller", raw_body=True, max_body=MAX_BLOB_SIZE)
    async def put_blob(body: BodyStream) -> Any:
        """Store the raw body (up to MAX_BLOB_SIZE bytes) as a blob; answers its content address. The body
        streams to a file (then, for a bucket, up to it): an upload costs the server a write buffer, not its
        size in memory."""
        return {"blob_id": await cp.blobs.put_stream(body, run)}

    @route("GET", "/v1/blobs/{blob_id}", "caller")
    async def get_blob(blob_id: str, who: Identity) -> RawFile | RawStream:
        """A blob: team-wide tokens read any; others only those their functions, inputs and calls reference.
        Sent in parts as it is read: from its file, or as it comes from the bucket."""
        if not who.team_wide:
            await run(cp.access.check_blob, who, blob_id)
        if isinstance(cp.blobs, DirectoryBlobStore):
            return RawFile(await run(cp.blobs.path, blob_id))
        return RawStream(iterate(await run(cp.blobs.open_read, blob_id), run))

    # -- workers -----------------------------------------------------------------------------------------
    @route("POST", "/v1/workers/{worker_id}/register", "worker", body=WorkerRegister)
    async def register(worker_id: str, b: WorkerRegister) -> Any:
        return await run(cp.workers.register_worker, worker_id, b.pid, b.host)

    @route("POST", "/v1/workers/{worker_id}/ready", "worker")
    async def ready(worker_id: str) -> Any:
        await run(cp.workers.worker_ready, worker_id)
        return {}

    def _output_items(rows: list[OutputTuple]) -> list[OutputItem]:
        return [OutputItem(i, s, d, bl, g, r) for i, s, d, bl, g, r in rows]

    async def _worker_function(worker_id: str) -> tuple[str, str]:
        """(function id, state) of a worker: from memory on the event loop, else read on the thread pool."""
        got = cp.workers.cached_function(worker_id)
        return got if got is not None else await run(cp.workers.worker_function, worker_id)

    @route("POST", "/v1/workers/{worker_id}/claim", "worker", body=Claim, websocket=True)
    async def claim(worker_id: str, b: Claim) -> dict[str, Any]:
        """Record finished inputs, then claim up to ``max`` inputs, long-polling up to ``wait`` seconds."""
        outputs = _output_items(b.outputs)
        fid, state = await _worker_function(worker_id)
        if state in GONE:
            if outputs:
                await worker_op(WorkerOp(worker_id, outputs), len(outputs))
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
                if look or outputs:
                    # the outputs it carries and the claim in one write
                    op = WorkerOp(worker_id, outputs, (fid, max_n) if look else None)
                    outputs = []
                    rows = (await worker_op(op, max(max_n if look else 0, len(op.outputs)))).claimed
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0 or dev.is_set() or cp.hub.closing:
                    break
                if (await _worker_function(worker_id))[1] in GONE:
                    # stopped while this claim waited (its process died): never park for it again
                    dev.set()
                    break
                pc = ParkedClaim(worker_id, fid, max_n, loop, ev)
                cp.park(pc)
                timed_out = False
                try:
                    # the whole wait: woken by inputs handed over or announced, a drain, the server closing,
                    # or the function's periodic re-read (ControlPlane.park)
                    await asyncio.wait_for(ev.wait(), remaining)
                except TimeoutError:
                    timed_out = True
                finally:
                    if not cp.unpark(pc):
                        await pc.done.wait()  # inputs were promised: they are being written
                if pc.rows:
                    rows = pc.rows
                    break
                if (await _worker_function(worker_id))[1] in GONE:
                    dev.set()
                    break
                if timed_out:
                    break  # nothing came: the worker claims again at once, and the periodic re-read looks
                # announced inputs cleared the function's empty mark: look; a periodic re-read looks unless a
                # claim of the function found it empty moments ago (one re-read serves every parked claim)
                look = cp.claim_may_find(fid)
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
        await worker_op(WorkerOp(worker_id, _output_items(b.outputs)), len(b.outputs))
        return {}

    @route("POST", "/v1/workers/{worker_id}/heartbeat", "worker", body=Heartbeat)
    async def heartbeat(worker_id: str, b: Heartbeat) -> Any:
        op = WorkerOp(worker_id, beat=(b.in_flight, b.idle, b.held, b.served, b.busy_s))
        return (await worker_op(op, 1 + len(b.held))).beat

    @route("POST", "/v1/workers/{worker_id}/logs", "worker", body=LogsPost)
    async def worker_logs(worker_id: str, b: LogsPost) -> Any:
        await run(cp.activity.add_logs, worker_id, [list(x) for x in b.lines])
        return {}

    @route("POST", "/v1/workers/{worker_id}/release", "worker", body=Release)
    async def release(worker_id: str, b: Release) -> Any:
        return {"requeued": await run(cp.workers.release_inputs, worker_id, b.input_ids)}

    @route("POST", "/v1/workers/{worker_id}/preempting", "worker", body=Preempting)
    async def preempting(worker_id: str, b: Preempting) -> Any:
        """The worker's node got its cloud's preemption notice: it stops claiming, its inputs go back to the
        queue now, and a replacement starts (see Health.on_worker_notice)."""
        rec = cp.reconciler
        if rec is None:
            await run(cp.workers.drain_worker, worker_id, "preemption notice")
            return {"requeued": await run(cp.workers.release_inputs, worker_id, None)}
        return {"requeued": await run(rec.on_worker_notice, worker_id, b.at, b.source)}

    @route("POST", "/v1/workers/{worker_id}/stopped", "worker", body=Stopped)
    async def stopped(worker_id: str, b: Stopped) -> Any:
        await run(lambda: cp.workers.worker_stopped(worker_id, b.reason, crashed=b.crashed))
        return {}

    # -- tokens -----------------------------------------------------------------------------------------
    @route("POST", "/v1/tokens", "owner", body=TokenCreate)
    async def create_token(b: TokenCreate) -> Any:
        """Mint an owner, member or proxy-auth token (a member's or proxy's optionally scoped to named apps).
        Shown once."""
        scope = "owner" if b.kind == "owner" else member_scope(b.apps, b.kind)
        if b.kind == "owner" and b.apps:
            raise exc.InvalidError(
                "An owner token cannot be scoped to apps; make a member token (kind=member)."
            )
        token_id, token = await run(cp.tokens.create_token, scope, b.name)
        who = identity_for(scope, token_id)
        assert who is not None
        apps = sorted(who.apps) if who.apps is not None else None
        return {"token": token, "id": token_id, "kind": who.kind, "apps": apps}

    @route("GET", "/v1/tokens", "owner")
    async def list_tokens() -> Any:
        """Every token's id, name, kind, apps and state (never the token)."""
        return await run(cp.tokens.list)

    @route("POST", "/v1/tokens/{token_id}/revoke", "owner")
    async def revoke_token(token_id: str) -> Any:
        """Revoke a token: every control plane on this database refuses it within seconds."""
        await run(cp.tokens.revoke, token_id)
        return {"revoked": token_id}

    # -- state objects: dicts, queues, secrets, volumes (each kind's routes in a module of its own) ---------
    from cloudmodal.server import (
        api_container,
        api_cost,
        api_dashboard,
        api_kv,
        api_sandbox,
        api_secrets,
        api_volumes,
    )

    for module in (api_container, api_cost, api_dashboard, api_kv, api_sandbox, api_secrets, api_volumes):
        module.add_routes(route, run, cp)

    router = TableApp(routes, authenticate, title="cloudmodal control plane", on_startup=cp.hub.bind)
    return router
