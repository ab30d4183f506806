"""HTTP routes of Dicts and Queues (``cloudmodal.Dict``, ``cloudmodal.Queue``): added to the control plane's route table by
:func:`cloudmodal.server.api.build_routes`.

Access: data operations are for owners, unscoped members and workers (function code uses dicts and queues);
a member token scoped to apps is refused (dicts and queues belong to no app). Listing and deleting named
objects is for the team-wide tokens; a worker may create objects (``from_name(create_if_missing=True)``,
ephemeral ones) and delete the ephemeral ones it created. The data routes are also served as WebSockets
(the client sends each thread's operations over one).

Blocking gets and puts long-poll here, up to ``min(timeout, 50 s)`` a request: woken through the hub when this
control plane stores or takes items, and every second to re-read (another control plane on the same
PostgreSQL may have)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, Field, StringConstraints

from cloudmodal import exception as exc
from cloudmodal.dict import MAX_DICT_KEY, MAX_DICT_REQUEST, MAX_DICT_VALUE
from cloudmodal.queue import MAX_PARTITION_BYTES, MAX_PARTITION_ITEMS, MAX_QUEUE_ITEM, MAX_TTL_S
from cloudmodal.server.limits import SMALL_BODY, RowId, Seconds
from cloudmodal.server.security import Identity, app_scoped_refusal
from cloudmodal.server.svc_kv import KV, Kind, QueueFull

MAX_LONG_POLL_S = 50.0
REREAD_S = 1.0
SHORT_ROWS = 16  # an operation on at most this many rows may run on the event loop (see add_routes.db)  # a long poll re-reads this often (other control planes on the database write too)
MiB = 1024 * 1024
R = TypeVar("R")

ObjectName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9._-]{1,64}$")]
Partition = Annotated[str, StringConstraints(max_length=64)]  # "" is the default partition
Key = Annotated[bytes, Field(max_length=MAX_DICT_KEY)]
Value = Annotated[bytes, Field(max_length=MAX_DICT_VALUE)]
Item = Annotated[bytes, Field(max_length=MAX_QUEUE_ITEM)]
# the client's id of one non-idempotent request, the same on its retries (see svc_kv's docstring)
RequestId = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z_-]{16,64}$")]


class ObjectCreate(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    name: ObjectName | None = None  # None: an ephemeral object
    allow_existing: bool = False


class ObjectLookup(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    name: ObjectName
    create_if_missing: bool = False


class Empty(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY


class DictKeys(BaseModel):
    max_body: ClassVar[int] = MAX_DICT_REQUEST + MiB

    keys: list[Key] = Field(max_length=10_000)


class DictKey(BaseModel):
    max_body: ClassVar[int] = MAX_DICT_KEY + 1024

    key: Key


class DictPop(BaseModel):
    max_body: ClassVar[int] = MAX_DICT_KEY + 1024

    key: Key
    request_id: RequestId | None = None  # a retry answers the value the first attempt removed


class DictPut(BaseModel):
    max_body: ClassVar[int] = MAX_DICT_REQUEST + MiB

    entries: list[tuple[Key, Value]] = Field(max_length=100_000)
    skip_if_exists: bool = False
    request_id: RequestId | None = None  # a retry answers what the first attempt wrote


class DictScan(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    after: Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{2}){0,32}$")] = ""  # a key hash, hex
    limit: Annotated[int, Field(ge=1, le=10_000)] = 1000
    keys: bool = True
    values: bool = True


class QueuePut(BaseModel):
    max_body: ClassVar[int] = MAX_PARTITION_BYTES + 4 * MiB

    values: list[Item] = Field(max_length=MAX_PARTITION_ITEMS)
    partition: Partition = ""
    partition_ttl: Annotated[float, Field(gt=0, le=MAX_TTL_S, allow_inf_nan=False)] = MAX_TTL_S
    timeout: Seconds = 0.0  # how long to wait for space when the partition is full
    request_id: RequestId | None = None  # a retry of a stored put stores nothing more


class QueueGet(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    n: Annotated[int, Field(ge=1, le=MAX_PARTITION_ITEMS)] = 1
    partition: Partition = ""
    timeout: Seconds = 0.0
    request_id: RequestId | None = None  # a retry answers the values the first attempt took


class QueueLen(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    partition: Partition = ""
    total: bool = False


class QueueClear(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    partition: Partition = ""
    all: bool = False


class QueuePeek(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    partition: Partition = ""
    after: RowId = 0
    limit: Annotated[int, Field(ge=1, le=MAX_PARTITION_ITEMS)] = 1000
    timeout: Seconds = 0.0


def _may_use(who: Identity) -> None:
    """Dicts and queues are the team's: refused to a member token scoped to apps."""
    refusal = app_scoped_refusal(who, "use dicts or queues", "dicts and queues")
    if refusal is not None:
        raise exc.PermissionDeniedError(refusal)


def _may_manage(who: Identity, what: str) -> None:
    """Listing and deleting named objects: team-wide tokens only."""
    if not who.team_wide:
        raise exc.PermissionDeniedError(
            f"This token may not {what}: that needs the owner's token or an unscoped member token."
        )


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)`` (the decorator ``build_routes``
    uses); ``run(fn, *args)`` runs blocking work (the database) off the event loop."""
    svc = KV(cp, durable=cp.settings.kv_durable)

    async def db(fn: Callable[..., R], *args: Any, rows: int = 1) -> R:
        """A database operation: a short one (a few ``rows``) inline while SQLite has no write in progress
        (a thread hop costs more than the statement), else on the thread pool."""
        if rows <= SHORT_ROWS and cp.db.write_idle():
            return fn(*args)
        result: R = await run(fn, *args)
        return result

    async def long_poll(keys: list[str], attempt: Callable[[], Any], timeout: float, rows: int) -> Any:
        """``attempt()`` (of about ``rows`` rows) until it answers something truthy or ``min(timeout, 50 s)``
        passes: woken by the hub on ``keys``, and every REREAD_S regardless."""
        result = await db(attempt, rows=rows)
        if result or timeout <= 0 or cp.hub.closing:
            return result
        ev = asyncio.Event()
        for k in keys:
            cp.hub.watch(k, ev)
        try:
            deadline = time.monotonic() + min(timeout, MAX_LONG_POLL_S)
            while True:
                ev.clear()
                result = await db(attempt, rows=rows)
                remaining = deadline - time.monotonic()
                if result or remaining <= 0 or cp.hub.closing:
                    return result
                try:
                    await asyncio.wait_for(ev.wait(), min(remaining, REREAD_S))
                except TimeoutError:
                    pass
        finally:
            for k in keys:
                cp.hub.unwatch(k, ev)

    def object_routes(kind: Kind, base: str) -> None:
        """Creation, look-up and listing: the same for both kinds."""

        @route("POST", base, "caller", body=ObjectCreate)
        async def create(b: ObjectCreate, who: Identity) -> Any:
            """A new object: named, or (without ``name``) ephemeral."""
            _may_use(who)
            return await run(lambda: svc.create(kind, b.name, who.principal, allow_existing=b.allow_existing))

        @route("POST", f"{base}/lookup", "caller", body=ObjectLookup)
        async def lookup(b: ObjectLookup, who: Identity) -> Any:
            """The named object (404 with the fix when missing, unless ``create_if_missing``)."""
            _may_use(who)
            return await run(
                lambda: svc.lookup(
                    kind, b.name, create_if_missing=b.create_if_missing, principal=who.principal
                )
            )

        @route("GET", base, "member")
        async def list_objects(
            who: Identity,
            limit: Annotated[int, Field(ge=0, le=100_000)] = 1000,
            created_before: float | None = None,
        ) -> Any:
            """Named objects, newest first."""
            _may_manage(who, f"list {kind}s")
            return await run(svc.list_named, kind, limit, created_before)

    object_routes("dict", "/v1/dicts")
    object_routes("queue", "/v1/queues")

    async def info(kind: Kind, oid: str, who: Identity) -> Any:
        _may_use(who)
        return await db(svc.info, kind, oid)

    async def delete(kind: Kind, oid: str, who: Identity) -> Any:
        _may_use(who)
        row = await run(svc.info, kind, oid)
        if not who.team_wide and not (row["ephemeral"] and row["created_by"] == who.principal):
            raise exc.PermissionDeniedError(
                f"This token may not delete {kind} {oid}: named objects are deleted with the owner's token or "
                "an unscoped member token."
            )
        await run(svc.delete, kind, oid)
        return {"deleted": oid}

    async def heartbeat(kind: Kind, oid: str, who: Identity) -> Any:
        _may_use(who)
        await db(svc.heartbeat, kind, oid)
        return {}

    # the same three per kind (the router reads each handler's path parameter from its signature)
    @route("GET", "/v1/dicts/{dict_id}", "caller")
    async def dict_info(dict_id: str, who: Identity) -> Any:
        """The dict's id, name, ephemeral flag, creation time and creator."""
        return await info("dict", dict_id, who)

    @route("POST", "/v1/dicts/{dict_id}/delete", "caller")
    async def dict_delete(dict_id: str, who: Identity) -> Any:
        """Delete the dict and its entries: named dicts by team-wide tokens; ephemeral ones also by the
        token that made them."""
        return await delete("dict", dict_id, who)

    @route("POST", "/v1/dicts/{dict_id}/heartbeat", "caller")
    async def dict_heartbeat(dict_id: str, who: Identity) -> Any:
        """An ephemeral dict's client is alive (one idle 10 minutes is deleted)."""
        return await heartbeat("dict", dict_id, who)

    @route("GET", "/v1/queues/{queue_id}", "caller")
    async def queue_info(queue_id: str, who: Identity) -> Any:
        """The queue's id, name, ephemeral flag, creation time and creator."""
        return await info("queue", queue_id, who)

    @route("POST", "/v1/queues/{queue_id}/delete", "caller")
    async def queue_delete(queue_id: str, who: Identity) -> Any:
        """Delete the queue and its items (as for dicts)."""
        return await delete("queue", queue_id, who)

    @route("POST", "/v1/queues/{queue_id}/heartbeat", "caller")
    async def queue_heartbeat(queue_id: str, who: Identity) -> Any:
        """An ephemeral queue's client is alive."""
        return await heartbeat("queue", queue_id, who)

    # -- dicts ------------------------------------------------------------------------------------------
    @route("POST", "/v1/dicts/{dict_id}/get", "caller", body=DictKeys, websocket=True)
    async def dict_get(dict_id: str, b: DictKeys, who: Identity) -> Any:
        """The values of ``keys`` (pickled), ``None`` where absent."""
        _may_use(who)
        return {"values": await db(svc.dict_get, dict_id, b.keys, rows=len(b.keys))}

    @route("POST", "/v1/dicts/{dict_id}/put", "caller", body=DictPut, websocket=True)
    async def dict_put(dict_id: str, b: DictPut, who: Identity) -> Any:
        """Store ``entries`` in one transaction; answers how many were written."""
        _may_use(who)
        n = await db(
            lambda: svc.dict_put(
                dict_id,
                [(k, v) for k, v in b.entries],
                skip_if_exists=b.skip_if_exists,
                request_id=b.request_id,
            ),
            rows=len(b.entries),
        )
        return {"written": n}

    @route("POST", "/v1/dicts/{dict_id}/pop", "caller", body=DictPop, websocket=True)
    async def dict_pop(dict_id: str, b: DictPop, who: Identity) -> Any:
        """Remove ``key`` and answer its value (null when absent)."""
        _may_use(who)
        return {"value": await db(svc.dict_pop, dict_id, b.key, b.request_id)}

    @route("POST", "/v1/dicts/{dict_id}/contains", "caller", body=DictKey, websocket=True)
    async def dict_contains(dict_id: str, b: DictKey, who: Identity) -> Any:
        _may_use(who)
        return {"found": await db(svc.dict_contains, dict_id, b.key)}

    @route("POST", "/v1/dicts/{dict_id}/len", "caller", body=Empty, websocket=True)
    async def dict_len(dict_id: str, b: Empty, who: Identity) -> Any:
        _may_use(who)
        return {"len": await run(svc.dict_len, dict_id)}

    @route("POST", "/v1/dicts/{dict_id}/clear", "caller", body=Empty, websocket=True)
    async def dict_clear(dict_id: str, b: Empty, who: Identity) -> Any:
        _may_use(who)
        return {"removed": await run(svc.dict_clear, dict_id)}

    @route("POST", "/v1/dicts/{dict_id}/scan", "caller", body=DictScan, websocket=True)
    async def dict_scan(dict_id: str, b: DictScan, who: Identity) -> Any:
        """A page of entries (``[key?, value?]``) after the cursor ``after``; ``next``: the following page's
        cursor, null at the end."""
        _may_use(who)
        entries, nxt = await run(
            lambda: svc.dict_scan(dict_id, b.after, b.limit, keys=b.keys, values=b.values)
        )
        return {"entries": entries, "next": nxt}

    # -- queues -----------------------------------------------------------------------------------------
    @route("POST", "/v1/queues/{queue_id}/put", "caller", body=QueuePut, websocket=True)
    async def queue_put(queue_id: str, b: QueuePut, who: Identity) -> Any:
        """Append ``values`` (all or none); when the partition is full, wait up to ``timeout`` for space,
        then answer ``{"full": why}``."""
        _may_use(who)
        reason: list[str] = []

        def attempt() -> bool:
            try:
                svc.queue_put(queue_id, b.partition, b.values, b.partition_ttl, b.request_id)
                return True
            except QueueFull as e:
                reason[:] = [str(e)]
                return False

        keys = [f"queue-space:{queue_id}:{b.partition}", f"queue:{queue_id}"]
        if await long_poll(keys, attempt, b.timeout, len(b.values)):
            return {"full": None}
        return {"full": reason[0] if reason else "The partition is full."}

    @route("POST", "/v1/queues/{queue_id}/get", "caller", body=QueueGet, websocket=True)
    async def queue_get(queue_id: str, b: QueueGet, who: Identity) -> Any:
        """Take up to ``n`` values from the front of the partition, waiting up to ``timeout`` for one."""
        _may_use(who)
        keys = [f"queue:{queue_id}:{b.partition}", f"queue:{queue_id}"]
        values = await long_poll(
            keys, lambda: svc.queue_get(queue_id, b.partition, b.n, b.request_id), b.timeout, b.n
        )
        return {"values": values}

    @route("POST", "/v1/queues/{queue_id}/len", "caller", body=QueueLen, websocket=True)
    async def queue_len(queue_id: str, b: QueueLen, who: Identity) -> Any:
        _may_use(who)
        return {"len": await db(svc.queue_len, queue_id, b.partition, b.total)}

    @route("POST", "/v1/queues/{queue_id}/clear", "caller", body=QueueClear, websocket=True)
    async def queue_clear(queue_id: str, b: QueueClear, who: Identity) -> Any:
        _may_use(who)
        return {"removed": await run(svc.queue_clear, queue_id, b.partition, b.all)}

    @route("POST", "/v1/queues/{queue_id}/peek", "caller", body=QueuePeek, websocket=True)
    async def queue_peek(queue_id: str, b: QueuePeek, who: Identity) -> Any:
        """``[id, value]`` of items after ``after`` without taking them, waiting up to ``timeout`` for one."""
        _may_use(who)
        keys = [f"queue:{queue_id}:{b.partition}", f"queue:{queue_id}"]
        items = await long_poll(
            keys, lambda: svc.queue_peek(queue_id, b.partition, b.after, b.limit), b.timeout, b.limit
        )
        return {"items": items}
