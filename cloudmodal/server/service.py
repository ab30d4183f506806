"""The control plane's operations, independent of HTTP: apps, functions, calls, workers, logs, events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.auth import TokenStore
from cloudmodal.server.blobs import BlobStore
from cloudmodal.server.db import Database
from cloudmodal.server.hotsql import HotStatements
from cloudmodal.server.hub import Hub
from cloudmodal.server.queue import DEFAULT_CRASH_BUDGET, ClaimedInput, FunctionPolicy, InputQueue, OutputItem
from cloudmodal.server.secretbox import SecretBox
from cloudmodal.server.security import (
    FunctionFacts,
    Identity,
    WorkerFacts,
    may_call,
    may_read_call,
    may_use_app,
)
from cloudmodal.spec import FunctionSpec

log = logging.getLogger("cloudmodal.server")

A = models.apps
F = models.functions
CA = models.calls
W = models.workers
E = models.events
L = models.logs
D = models.deployments
P = models.pools

LIVE_WORKER_STATES = ("starting", "ready", "draining")
# a function's row as the API shows it: never its secrets' values, nor where its code lives
FUNCTION_VIEW = ("id", "app_id", "name", "parent_id", "spec", "module", "version", "state", "created_at")
# what an instance of a parametrized class inherits from its class's function (never from the request)
INHERITED = ("spec", "module", "source_name", "source_blob", "source_dir", "inline_env")


@dataclass
class Settings:
    database_url: str
    state_dir: Path
    # anonymous requests from loopback act as the owner: an explicit, warned-about opt-in only (any local user
    # and any same-host proxy then controls the control plane)
    allow_loopback_anonymous: bool = False
    lease_s: float = 30.0  # inputs claimed by a worker that stops heartbeating are requeued after this
    heartbeat_s: float = 3.0
    worker_timeout_s: float = 30.0  # a worker silent this long is considered dead
    client_timeout_s: float = 60.0  # an ephemeral app whose client is silent this long is stopped
    # how long a worker keeps trying to reach a control plane that went away before it exits: long for a
    # server that restarts (workers resume), short for a client's embedded one (it is not coming back)
    worker_reconnect_s: float = 600.0
    crash_budget: int = DEFAULT_CRASH_BUDGET
    reconcile_interval_s: float = 0.25
    providers: list[str] = field(default_factory=lambda: ["local"])
    # payloads over the inline limit: control planes that share a database must share this too
    blob_dir: Path | None = None  # default: state_dir / "blobs"
    # retention (cloudmodal/server/retention.py): finished calls (with their inputs, outputs and blobs) are
    # kept this long after their last activity; logs and events of ephemeral runs this long after they stop,
    # everyone else's this long after they were written
    retention_calls_ephemeral_s: float = 86400.0
    retention_calls_deployed_s: float = 7 * 86400.0
    retention_logs_ephemeral_s: float = 86400.0
    retention_logs_deployed_s: float = 30 * 86400.0
    retention_interval_s: float = 60.0  # how often the reconciling control plane prunes


def _now() -> float:
    return time.time()


# -- in-memory hand-off ---------------------------------------------------------------------------------
# The database is the record; these are shortcuts within one control-plane process. A worker long-polling
# for work parks a ParkedClaim: new inputs for its function are written to the database already claimed by
# it, in the transaction that creates them, and handed to it without a second transaction or a re-read. A
# caller waiting on a one-input call opens an OutputMailbox: the rows a worker's outputs wrote are passed to
# it as they commit. Both wake their waiter through an asyncio.Event on the server's loop, set from any
# thread. Anything that does not go through them (other control-plane processes, requeues, retries) still
# reaches waiters through the hub and their periodic re-reads of the database.


class ParkedClaim:
    """A worker's claim waiting for inputs. ``taken``: promised inputs (under the control plane's lock);
    ``done`` is set once they are written (``rows``, possibly empty when that write failed)."""

    __slots__ = ("worker_id", "function_id", "max_n", "loop", "wake", "done", "rows", "taken", "price")

    def __init__(
        self,
        worker_id: str,
        function_id: str,
        max_n: int,
        loop: asyncio.AbstractEventLoop,
        wake: asyncio.Event,
    ) -> None:
        self.worker_id = worker_id
        self.function_id = function_id
        self.max_n = max(int(max_n), 1)
        self.loop = loop
        self.wake = wake
        self.done = asyncio.Event()
        self.rows: list[ClaimedInput] = []
        self.taken = False
        # what giving this worker work costs (set when parked): its price per hour, or 0 for a worker of its
        # pool's on-demand floor (kept, and paid, whether it works or not); the lowest is handed inputs first
        self.price = 0.0


def _next_taker(parked: list[ParkedClaim]) -> int:
    """Which parked claim gets the next inputs: the cheapest worker's, the most recently parked among equals.

    Work goes where it costs least, so the dearer workers are the ones left idle, and the autoscaler (which
    stops the dearest idle workers first) scales them down; the same rule keeps a pool of equals' work on few
    workers, so the rest stay idle long enough to scale down at all."""
    best = len(parked) - 1
    price = parked[best].price
    for i in range(best - 1, -1, -1):
        if parked[i].price < price:
            best, price = i, parked[i].price
    return best


def _settle_claim(pc: ParkedClaim, rows: list[ClaimedInput]) -> None:
    pc.rows = rows
    pc.done.set()
    pc.wake.set()


class OutputMailbox:
    """Output rows of one call, delivered as they commit, for a caller long-polling it."""

    __slots__ = ("call_id", "loop", "wake", "rows")

    def __init__(self, call_id: str, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self.call_id = call_id
        self.loop = loop
        self.wake = wake
        self.rows: list[list[Any]] = []

    def final(self) -> list[list[Any]] | None:
        """Every row of a one-input call once its final output is here (the worker posts a call's outputs
        in order, so the items before it have been delivered already); None until then."""
        if any(r[2] == -1 for r in self.rows):
            return sorted(self.rows, key=lambda r: r[0])
        return None


def _mail(mb: OutputMailbox, rows: list[list[Any]]) -> None:
    mb.rows.extend(rows)
    mb.wake.set()


def _discard(registry: dict[str, list[Any]], key: str, item: Any) -> None:
    """Remove ``item`` from ``registry[key]`` if there, and the key once its list is empty."""
    items = registry.get(key)
    if items is not None:
        try:
            items.remove(item)
        except ValueError:
            pass
        if not items:
            del registry[key]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is stopping, and the waiter with it
        pass


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.blobs = BlobStore(settings.blob_dir or settings.state_dir / "blobs")
        self.hub = Hub()
        self.tokens = TokenStore(self.db)
        self.secrets = SecretBox.for_state_dir(settings.state_dir)
        self._policies: dict[str, FunctionPolicy] = {}
        self._specs: dict[str, FunctionSpec] = {}
        self.queue = InputQueue(self.db, self.policy_for)
        self._cancel_requests: dict[str, set[int]] = {}  # worker id -> input ids to interrupt
        self._startup_failures: dict[str, int] = {}  # function id -> consecutive workers that failed to start
        self._lock = threading.Lock()
        self.reconciler: Any = None  # set by server.app when it starts the reconciler
        self._parked: dict[str, list[ParkedClaim]] = {}  # function id -> claims waiting, newest last
        self._mailboxes: dict[str, list[OutputMailbox]] = {}  # call id -> waiting callers
        self._workers: dict[
            str, tuple[str, str]
        ] = {}  # worker id -> (function id, state), this process's view
        self._prices: dict[str, float] = {}  # worker id -> price per hour (which parked worker gets inputs)
        self._floors: dict[str, frozenset[str]] = {}  # function id -> its on-demand floor's workers
        self._claimed_empty: dict[str, float] = {}  # function id -> when a claim last found nothing
        self._active_written: dict[str, float] = {}  # function id -> last_active_at last written
        self._service: dict[str, float] = {}  # function id -> mean seconds per input (workers' reports)
        # facts the access rules need, which never change for an id (see security.py)
        self._stop_failed: set[str] = set()  # abandoned apps whose stop failed (logged once)
        self._fn_facts: dict[str, FunctionFacts] = {}
        self._worker_facts: dict[str, WorkerFacts] = {}
        self._call_facts: dict[str, tuple[str, str | None]] = {}  # call id -> (function id, created by)

    # -- functions' policies (cached; a redeploy replaces them) ------------------------------------------
    def spec_of(self, function_id: str) -> FunctionSpec:
        spec = self._specs.get(function_id)
        if spec is None:
            with self.db.read() as conn:
                row = conn.execute(select(F.c.spec, F.c.parent_id).where(F.c.id == function_id)).first()
            if row is None:
                raise NotFoundError(f"Function {function_id} not found.")
            spec = FunctionSpec.from_wire(row[0])
            self._specs[function_id] = spec
        return spec

    def policy_for(self, function_id: str) -> FunctionPolicy:
        p = self._policies.get(function_id)
        if p is None:
            try:
                spec = self.spec_of(function_id)
                p = FunctionPolicy(retries=spec.retries, crash_budget=self.settings.crash_budget)
            except NotFoundError:
                p = FunctionPolicy(crash_budget=self.settings.crash_budget)
            self._policies[function_id] = p
        return p

    # -- access: the facts security.py's rules decide on, and the checks handlers make ---------------------
    FACTS_CACHE_MAX = 50_000

    def _remember(self, cache: dict[str, Any], key: str, value: Any) -> None:
        if len(cache) >= self.FACTS_CACHE_MAX:
            cache.clear()  # a cache, not a record: anything dropped is read again
        cache[key] = value

    def function_facts(self, function_id: str) -> FunctionFacts:
        got = self._fn_facts.get(function_id)
        if got is None:
            with self.db.read() as conn:
                row = conn.execute(
                    select(F.c.app_id, A.c.name, A.c.ephemeral)
                    .select_from(F.join(A, A.c.id == F.c.app_id))
                    .where(F.c.id == function_id)
                ).first()
            if row is None:
                raise NotFoundError(f"Function {function_id} not found.")
            got = FunctionFacts(function_id, row[0], row[1], not row[2])
            self._remember(self._fn_facts, function_id, got)
        return got

    def worker_facts(self, worker_id: str) -> WorkerFacts:
        got = self._worker_facts.get(worker_id)
        if got is None:
            row = self.worker_row(worker_id)
            got = WorkerFacts(worker_id, row["function_id"], row["app_id"])
            self._remember(self._worker_facts, worker_id, got)
        return got

    def _own(self, who: Identity) -> WorkerFacts | None:
        return self.worker_facts(who.worker_id) if who.worker_id else None

    def check_app(self, who: Identity, name_or_id: str) -> dict[str, Any]:
        """The app, if ``who`` may manage or read it (else 404 / 403)."""
        app = self.find_app(name_or_id)
        if not may_use_app(who, app["name"]):
            raise PermissionDeniedError(
                f"This token may not use app {app['name']!r}"
                + (f": it is scoped to apps {', '.join(sorted(who.apps))}." if who.apps else ".")
                + " `cloudmodal token create --app NAME` makes a token for it."
            )
        return app

    def check_callable(self, who: Identity, function_id: str) -> FunctionFacts:
        facts = self.function_facts(function_id)
        if not who.team_wide and not may_call(who, facts, self._own(who)):
            raise PermissionDeniedError(
                f"This token may not call function {function_id} of app {facts.app_name!r}"
                + (
                    f": it is scoped to apps {', '.join(sorted(who.apps))}."
                    if who.apps
                    else " (a worker calls its own app's functions and deployed apps')."
                    if who.kind == "worker"
                    else "."
                )
                + " `cloudmodal token create --app NAME` makes a token for it."
            )
        return facts

    def _call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        """(function id, created by) of a call, None for an unknown one (cached: neither ever changes)."""
        got = self._call_facts.get(call_id)
        if got is None:
            with self.db.read() as conn:
                row = conn.execute(
                    select(CA.c.function_id, CA.c.created_by).where(CA.c.id == call_id)
                ).first()
            if row is None:
                return None
            got = (row[0], row[1])
            self._remember(self._call_facts, call_id, got)
        return got

    def check_call(self, who: Identity, call_id: str) -> str:
        """The call's function id, if ``who`` may read or cancel the call (else 404 / 403)."""
        got = self._call_owner(call_id)
        if got is None:
            raise NotFoundError(f"Function call {call_id!r} not found.")
        if who.kind != "owner" and not may_read_call(who, got[1], self.function_facts(got[0])):
            raise PermissionDeniedError(f"This token may not read function call {call_id!r}.")
        return got[0]

    def check_blob(self, who: Identity, blob_id: str) -> None:
        """Team-wide tokens read any blob; others only the blobs their functions, inputs and calls reference."""
        if who.team_wide:
            return
        I = models.inputs  # noqa: E741
        O = models.outputs  # noqa: E741
        with self.db.read() as conn:
            if who.kind == "worker":
                own = self._own(who)
                assert own is not None
                ok = (
                    conn.execute(
                        select(F.c.id).where(
                            and_(
                                F.c.id == own.function_id,
                                or_(F.c.source_blob == blob_id, F.c.pickled_blob == blob_id),
                            )
                        )
                    ).first()
                    or conn.execute(
                        select(I.c.id)
                        .where(and_(I.c.args_blob == blob_id, I.c.worker_id == own.worker_id))
                        .limit(1)
                    ).first()
                    or conn.execute(
                        select(O.c.id)
                        .select_from(O.join(CA, CA.c.id == O.c.call_id))
                        .where(and_(O.c.data_blob == blob_id, CA.c.created_by == who.principal))
                        .limit(1)
                    ).first()
                )
            else:  # a member scoped to named apps: their functions' code and their calls' outputs
                apps = sorted(who.apps or ())
                ok = (
                    conn.execute(
                        select(F.c.id)
                        .select_from(F.join(A, A.c.id == F.c.app_id))
                        .where(
                            and_(
                                A.c.name.in_(apps),
                                or_(F.c.source_blob == blob_id, F.c.pickled_blob == blob_id),
                            )
                        )
                        .limit(1)
                    ).first()
                    or conn.execute(
                        select(O.c.id)
                        .select_from(O.join(CA, CA.c.id == O.c.call_id).join(A, A.c.id == CA.c.app_id))
                        .where(
                            and_(
                                O.c.data_blob == blob_id,
                                or_(A.c.name.in_(apps), CA.c.created_by == who.principal),
                            )
                        )
                        .limit(1)
                    ).first()
                )
        if not ok:
            raise PermissionDeniedError(f"This token may not read blob {blob_id}.")

    # -- events ------------------------------------------------------------------------------------------
    def event(
        self,
        kind: str,
        message: str,
        *,
        app_id: str | None = None,
        function_id: str | None = None,
        **data: Any,
    ) -> None:
        with self.db.write() as conn:
            conn.execute(
                E.insert().values(
                    app_id=app_id,
                    function_id=function_id,
                    ts=_now(),
                    kind=kind,
                    message=message,
                    data=data or None,
                )
            )
        log.info("%s %s: %s", app_id or "-", kind, message)
        if app_id:
            self.hub.notify(f"events:{app_id}")

    def events(self, app_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(E.c.id, E.c.ts, E.c.kind, E.c.function_id, E.c.message, E.c.data)
                .where(and_(E.c.app_id == app_id, E.c.id > after))
                .order_by(E.c.id)
                .limit(limit)
            ).all()
        return [dict(id=r[0], ts=r[1], kind=r[2], function_id=r[3], message=r[4], data=r[5]) for r in rows]

    # -- apps --------------------------------------------------------------------------------------------
    def create_app(self, app_id: str, name: str, ephemeral: bool, description: str = "") -> dict[str, Any]:
        now = _now()
        _validate_name(name, "App name")
        with self.db.write() as conn:
            existing = conn.execute(select(A).where(A.c.id == app_id)).first()
            if existing is not None:
                return dict(existing._mapping)
            if not ephemeral:
                dep = conn.execute(
                    select(A).where(and_(A.c.name == name, A.c.ephemeral.is_(False), A.c.state == "deployed"))
                ).first()
                if dep is not None:  # redeploy: same app, next version
                    version = dep.version + 1
                    conn.execute(update(A).where(A.c.id == dep.id).values(version=version))
                    return dict(dep._mapping) | {"version": version, "redeploy": True}
            conn.execute(
                A.insert().values(
                    id=app_id,
                    name=name,
                    state="running" if ephemeral else "deployed",
                    ephemeral=ephemeral,
                    created_at=now,
                    client_heartbeat_at=now,
                    version=1,
                    description=description,
                )
            )
        self.event(
            "app.created", f"{'ephemeral' if ephemeral else 'deployed'} app {name!r} created", app_id=app_id
        )
        return {"id": app_id, "name": name, "state": "running" if ephemeral else "deployed", "version": 1}

    def record_deployment(self, app_id: str, functions: list[str]) -> int:
        with self.db.write() as conn:
            version = conn.execute(select(A.c.version).where(A.c.id == app_id)).scalar_one_or_none()
            if version is None:
                raise NotFoundError(f"App {app_id} not found.")
            conn.execute(
                D.insert().values(app_id=app_id, version=version, created_at=_now(), functions=functions)
            )
        self.event(
            "app.deployed", f"version {version} deployed with {len(functions)} functions", app_id=app_id
        )
        return version

    def app_heartbeat(self, app_id: str) -> str:
        with self.db.write() as conn:
            conn.execute(update(A).where(A.c.id == app_id).values(client_heartbeat_at=_now()))
            state = conn.execute(select(A.c.state).where(A.c.id == app_id)).scalar_one_or_none()
        if state is None:
            raise NotFoundError(f"App {app_id} not found.")
        return state

    def find_app(self, name_or_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(A).where(A.c.id == name_or_id)).first()
            if row is None:
                row = conn.execute(
                    select(A)
                    .where(A.c.name == name_or_id)
                    .order_by((A.c.state == "stopped").asc(), A.c.created_at.desc())
                ).first()
        if row is None:
            raise NotFoundError(
                f"App {name_or_id!r} not found. `cloudmodal app list` shows the apps there are."
            )
        return dict(row._mapping)

    def stop_app(self, app_id: str, reason: str = "stopped by user") -> None:
        with self.db.write() as conn:
            conn.execute(
                update(A)
                .where(and_(A.c.id == app_id, A.c.state != "stopped"))
                .values(state="stopped", stopped_at=_now())
            )
            conn.execute(update(F).where(F.c.app_id == app_id).values(state="stopped"))
            call_ids = [r[0] for r in conn.execute(select(CA.c.id).where(CA.c.app_id == app_id)).all()]
        for cid in call_ids:
            self.cancel_call(cid)
        self.event("app.stopped", reason, app_id=app_id)
        self.hub.notify("reconcile")

    def list_apps(self, include_stopped: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            q = select(A).order_by(A.c.created_at.desc()).limit(limit)
            if not include_stopped:
                q = q.where(A.c.state != "stopped")
            apps = [dict(r._mapping) for r in conn.execute(q).all()]
            fn_rows = conn.execute(select(F.c.id, F.c.app_id, F.c.name, F.c.parent_id, F.c.spec)).all()
            pool_rows = {
                r.function_id: r
                for r in conn.execute(
                    select(P.c.function_id, P.c.desired, P.c.reason, P.c.fallen_back, P.c.market_state)
                ).all()
            }
            worker_rows = conn.execute(
                select(W.c.function_id, W.c.state, W.c.market, func.count())
                .where(W.c.state.in_(LIVE_WORKER_STATES))
                .group_by(W.c.function_id, W.c.state, W.c.market)
            ).all()
        counts = self.queue.counts()
        by_fn: dict[str, dict[str, int]] = {}
        for fid, state, market, n in worker_rows:
            d = by_fn.setdefault(fid, {})
            d[state] = d.get(state, 0) + n
            d[market] = d.get(market, 0) + n
        for a in apps:
            pools = []
            for fid, app_id, name, _parent_id, spec in fn_rows:
                if app_id != a["id"]:
                    continue
                w = by_fn.get(fid, {})
                pending, running = counts.get(fid, (0, 0))
                row = pool_rows.get(fid)
                pools.append(
                    dict(
                        function_id=fid,
                        name=name,
                        gpu=",".join(spec.get("gpu") or []) or "cpu",
                        workers=w,
                        pending=pending,
                        running=running,
                        # the autoscaler's last decision and the pool's market (None before its first)
                        desired=row.desired if row else None,
                        reason=row.reason if row else None,
                        fallen_back=bool(row.fallen_back) if row else False,
                        fallback_reason=(row.market_state or {}).get("fallback_reason") if row else None,
                    )
                )
            a["pools"] = pools
        return apps

    def history(self, name_or_id: str) -> list[dict[str, Any]]:
        app = self.find_app(name_or_id)
        with self.db.read() as conn:
            rows = conn.execute(select(D).where(D.c.app_id == app["id"]).order_by(D.c.version.desc())).all()
        return [dict(r._mapping) for r in rows]

    # -- functions ---------------------------------------------------------------------------------------
    def create_function(self, body: dict[str, Any], who: Identity | None = None) -> dict[str, Any]:
        """Register (or update) a function. An instance of a parametrized class (``parent_id``) inherits its
        class function's definition here, never from the request: a worker may create one (a nested call to a
        class with parameters) without being able to supply code or read the class's secrets."""
        from cloudmodal.server.wire_spec import validate_wire_spec

        body = dict(body)
        body.pop("sealed_env", None)  # set below for an inherited definition only, never by a request
        app_id = body["app_id"]
        name = body["name"]
        parent_id = body.get("parent_id")
        if who is not None and who.kind == "worker" and not parent_id:
            raise PermissionDeniedError("A worker may only create instances of a class (with `parent_id`).")
        if parent_id:
            parent = self.function_row(parent_id)
            if who is not None:
                self.check_callable(who, parent_id)
            if parent["app_id"] != app_id:
                raise InvalidError(
                    f"Function {parent_id} (`parent_id`) belongs to another app than {app_id}."
                )
            body.update({k: parent[k] for k in INHERITED})
            body["sealed_env"] = True  # the parent's inline_env is stored sealed already
        else:
            body["spec"] = validate_wire_spec(body["spec"])
        if who is not None and who.kind == "member":
            self.check_app(who, app_id)
        spec = FunctionSpec.from_wire(body["spec"])
        env = body.get("inline_env") or {}
        stored_env = env if body.get("sealed_env") else self.secrets.seal_env(env)
        definition = {
            k: body.get(k) for k in ("spec", "module", "source_blob", "pickled_blob", "source_name")
        } | {"inline_env": self.secrets.open_env(stored_env)}
        # keyed: the database never holds an unkeyed hash of a secret's value
        definition_hash = self.secrets.fingerprint(
            json.dumps(definition, sort_keys=True, default=str).encode()
        )
        if self.reconciler is not None:
            self.reconciler.check_resources(spec, allow_cpu_fallback=bool(body.get("allow_cpu_fallback")))
        now = _now()
        with self.db.write() as conn:
            app_state = conn.execute(select(A.c.state).where(A.c.id == app_id)).scalar_one_or_none()
            if app_state is None:
                raise NotFoundError(f"App {app_id} not found.")
            if app_state == "stopped":
                raise InvalidError(f"App {app_id} is stopped; start a new run.")
            row = conn.execute(
                select(F.c.id, F.c.definition_hash, F.c.version).where(
                    and_(F.c.app_id == app_id, F.c.name == name)
                )
            ).first()
            values = dict(
                spec=body["spec"],
                module=body.get("module") or "",
                source_name=body.get("source_name"),
                source_blob=body.get("source_blob"),
                source_dir=body.get("source_dir"),
                pickled_blob=body.get("pickled_blob"),
                inline_env=stored_env,
                parent_id=parent_id,
                state="active",
                last_active_at=now,
            )
            if row is None:
                fid = body.get("function_id") or new_id("fu")
                if conn.execute(select(F.c.id).where(F.c.id == fid)).first() is not None:
                    raise AlreadyExistsError(
                        f"Function id {fid!r} is taken by another function; leave `function_id` out to get a new one."
                    )
                conn.execute(
                    F.insert().values(
                        id=fid,
                        app_id=app_id,
                        name=name,
                        definition_hash=definition_hash,
                        version=1,
                        created_at=now,
                        **values,
                    )
                )
                version = 1
            else:
                fid = row[0]
                if who is not None and who.kind == "worker" and row[1] != definition_hash:
                    # a worker instantiates classes; it never changes an instance others use
                    raise AlreadyExistsError(f"Function {name!r} exists with another definition.")
                version = row[2] + (1 if row[1] != definition_hash else 0)
                conn.execute(
                    update(F)
                    .where(F.c.id == fid)
                    .values(definition_hash=definition_hash, version=version, **values)
                )
        self._specs.pop(fid, None)
        self._policies.pop(fid, None)
        if body.get("cpu_fallback_note"):
            self.event("function.cpu_fallback", body["cpu_fallback_note"], app_id=app_id, function_id=fid)
        self.hub.notify("reconcile")
        return {"function_id": fid, "version": version}

    def function_row(self, function_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(F).where(F.c.id == function_id)).first()
        if row is None:
            raise NotFoundError(f"Function {function_id} not found.")
        return dict(row._mapping)

    def function_view(self, who: Identity, function_id: str) -> dict[str, Any]:
        """A function's row as ``who`` may see it: only functions it may call, never secrets or code."""
        self.check_callable(who, function_id)
        return _view(self.function_row(function_id))

    def lookup_function(
        self, app_name: str | None, name: str, app_id: str | None = None, who: Identity | None = None
    ) -> dict[str, Any]:
        with self.db.read() as conn:
            if app_id:
                app = conn.execute(select(A.c.id, A.c.name).where(A.c.id == app_id)).first()
            else:
                app = conn.execute(
                    select(A.c.id, A.c.name).where(and_(A.c.name == app_name, A.c.state == "deployed"))
                ).first()
            if app is None:
                raise NotFoundError(
                    f"No deployed app named {app_name!r}. Deploy it with `cloudmodal deploy FILE`; "
                    "`cloudmodal app list` shows the apps there are."
                )
            row = conn.execute(
                select(F).where(and_(F.c.app_id == app[0], F.c.name == name, F.c.parent_id.is_(None)))
            ).first()
            if row is None:
                names = [
                    r[0]
                    for r in conn.execute(
                        select(F.c.name).where(and_(F.c.app_id == app[0], F.c.parent_id.is_(None)))
                    ).all()
                ]
                raise NotFoundError(
                    f"App {app_name!r} has no function or class {name!r}. It has: {', '.join(sorted(names)) or 'nothing'}."
                )
        out = dict(row._mapping)
        if who is not None:
            self.check_callable(who, out["id"])
            return _view(out)
        return out

    # -- calls -------------------------------------------------------------------------------------------
    def create_call(
        self,
        call_id: str,
        function_id: str,
        kind: str,
        inputs: list[Any] | None = None,
        created_by: str | None = None,
        owner: bool = False,
    ) -> bool:
        """Create a call (idempotent by id), and enqueue its first inputs in the same transaction.
        Returns whether the call existed already (a re-sent request: only its creator may re-send it)."""
        now = _now()
        leftover = False
        with self._handing_off() as assigned, self.db.hot() as hot:
            row = hot.function_state(function_id)
            if row is None:
                raise NotFoundError(f"Function {function_id} not found.")
            if row[1] != "active":
                raise InvalidError(
                    f"Function {function_id} belongs to a stopped app; start a new run or redeploy."
                )
            existed = not hot.insert_call(
                {
                    "id": call_id,
                    "function_id": function_id,
                    "app_id": row[0],
                    "kind": kind,
                    "created_at": now,
                    "num_inputs": 0,
                    "cancelled": False,
                    "created_by": created_by,
                }
            )
            if existed:
                self._same_caller(
                    hot.call_owner(call_id), call_id, function_id, None if owner else created_by
                )
            else:
                self._remember(self._call_facts, call_id, (function_id, created_by))
            if now - self._active_written.get(function_id, 0.0) >= 1.0:
                # the autoscaler's "last active" needs seconds, not every call
                hot.touch_function(function_id, now)
                self._active_written[function_id] = now
            if inputs:
                leftover = self._enqueue(hot, call_id, function_id, inputs, assigned)
        if inputs:
            self._inputs_arrived(function_id, wake_claimers=leftover)
        return existed

    @contextlib.contextmanager
    def _handing_off(self) -> Iterator[list[tuple[ParkedClaim, list[ClaimedInput]]]]:
        """Collects the parked claims :meth:`_enqueue` promised inputs to, and settles them on the way out:
        with their rows once the transaction inside has committed, with none if it failed (they re-read)."""
        assigned: list[tuple[ParkedClaim, list[ClaimedInput]]] = []
        try:
            yield assigned
        except BaseException:
            for pc, _ in assigned:
                _call_soon(pc.loop, _settle_claim, pc, [])
            raise
        for pc, rows in assigned:
            _call_soon(pc.loop, _settle_claim, pc, rows)

    def _enqueue(
        self,
        hot: HotStatements,
        call_id: str,
        function_id: str,
        inputs: list[Any],
        assigned: list[tuple[ParkedClaim, list[ClaimedInput]]],
    ) -> bool:
        """Write inputs in ``hot``'s transaction: first to the workers parked on the function (claimed by
        them; appended to ``assigned``, to be settled after the commit), the rest pending. Returns whether
        any are left pending."""
        with self._lock:
            takers: list[ParkedClaim] = []
            parked = self._parked.get(function_id)
            want = len(inputs)
            while parked and want > 0:
                pc = parked.pop(_next_taker(parked))
                pc.taken = True
                takers.append(pc)
                want -= pc.max_n
        i = 0
        try:
            for pc in takers:
                chunk = inputs[i : i + pc.max_n]
                i += len(chunk)
                rows = self.queue.put_claimed(
                    hot, call_id, function_id, chunk, pc.worker_id, self.settings.lease_s
                )
                assigned.append((pc, rows))
        except BaseException:
            for pc in takers[len(assigned) :]:
                _call_soon(pc.loop, _settle_claim, pc, [])
            raise
        rest = inputs[i:]
        if rest:
            self.queue.put(call_id, function_id, rest, hot=hot)
        return bool(rest)

    def call_row(self, call_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(CA).where(CA.c.id == call_id)).first()
        if row is None:
            raise NotFoundError(f"Function call {call_id!r} not found.")
        return dict(row._mapping)

    def _same_caller(
        self, found: tuple[str, str | None] | None, call_id: str, function_id: str, created_by: str | None
    ) -> None:
        """Inputs for an existing call come from its creator (``created_by`` None: anyone, i.e. the owner), for
        its function."""
        if found is None:
            raise NotFoundError(f"Function call {call_id!r} not found: create it first (POST /v1/calls).")
        if created_by is not None and found[1] != created_by:
            raise PermissionDeniedError(f"Function call {call_id!r} belongs to another caller.")
        if found[0] != function_id:
            raise InvalidError(f"Function call {call_id!r} is a call of {found[0]}, not of {function_id}.")

    def put_inputs(
        self,
        call_id: str,
        function_id: str,
        inputs: list[tuple[int, str | None, bytes | None, str | None]],
        created_by: str | None = None,
    ) -> int:
        self._same_caller(self._call_owner(call_id), call_id, function_id, created_by)
        with self._handing_off() as assigned, self.db.hot() as hot:
            leftover = self._enqueue(hot, call_id, function_id, inputs, assigned)
        self._inputs_arrived(function_id, wake_claimers=leftover)
        return len(inputs)

    def _inputs_arrived(self, function_id: str, *, wake_claimers: bool = True) -> None:
        if wake_claimers:
            self.inputs_pending(function_id)
        if self.reconciler is not None:
            self.reconciler.poke(function_id)

    def inputs_pending(self, function_id: str) -> None:
        """Inputs of the function may be waiting in the database: long-polling workers claim at once."""
        self._claimed_empty.pop(function_id, None)
        self.hub.notify(f"inputs:{function_id}")

    # -- the in-memory hand-off (see ParkedClaim / OutputMailbox) ------------------------------------------
    def park(self, pc: ParkedClaim) -> None:
        floor = self._floors.get(pc.function_id)
        pc.price = 0.0 if floor and pc.worker_id in floor else self._prices.get(pc.worker_id, 0.0)
        with self._lock:
            self._parked.setdefault(pc.function_id, []).append(pc)

    def set_floor(self, function_id: str, worker_ids: frozenset[str]) -> None:
        """The workers of the function's ``min_on_demand`` floor (the reconciler's choice): handed inputs
        first, as if free, since the pool keeps them anyway."""
        if worker_ids:
            self._floors[function_id] = worker_ids
        else:
            self._floors.pop(function_id, None)

    def unpark(self, pc: ParkedClaim) -> bool:
        """Withdraw a parked claim; False when inputs were promised to it already (wait for ``pc.done``)."""
        with self._lock:
            if pc.taken:
                return False
            _discard(self._parked, pc.function_id, pc)
            return True

    def claim_may_find(self, function_id: str, within_s: float = 0.5) -> bool:
        """False when a claim found nothing moments ago and no input arrived since: a worker can park at
        once without an empty claim transaction. Inputs made pending by paths that do not say so (another
        control-plane process, a retry's backoff ending) are found by the parked claim's periodic re-read."""
        t = self._claimed_empty.get(function_id)
        return t is None or _now() - t > within_s

    def open_mailbox(self, mb: OutputMailbox) -> None:
        with self._lock:
            self._mailboxes.setdefault(mb.call_id, []).append(mb)

    def close_mailbox(self, mb: OutputMailbox) -> None:
        with self._lock:
            _discard(self._mailboxes, mb.call_id, mb)

    def _deliver(self, written: dict[str, list[list[Any]]]) -> None:
        if not self._mailboxes:
            return
        with self._lock:
            targets = [(mb, rows) for cid, rows in written.items() for mb in self._mailboxes.get(cid, ())]
        for mb, rows in targets:
            _call_soon(mb.loop, _mail, mb, rows)

    def cancel_call(self, call_id: str) -> None:
        running = self.queue.cancel_call(call_id)
        if running:
            with self.db.read() as conn:
                I = models.inputs  # noqa: E741
                rows = conn.execute(select(I.c.id, I.c.worker_id).where(I.c.id.in_(running))).all()
            with self._lock:
                for iid, wid in rows:
                    if wid:
                        self._cancel_requests.setdefault(wid, set()).add(iid)
        self.hub.notify(f"outputs:{call_id}")

    # -- workers -----------------------------------------------------------------------------------------
    def add_worker(self, worker_id: str, app_id: str, function_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(
                W.insert().values(
                    id=worker_id,
                    app_id=app_id,
                    function_id=function_id,
                    state="starting",
                    started_at=_now(),
                    last_heartbeat=_now(),
                    **values,
                )
            )
        self._worker_state(worker_id, function_id, "starting")

    def register_worker(self, worker_id: str, pid: int | None, host: str) -> dict[str, Any]:
        with self.db.write() as conn:
            row = conn.execute(select(W.c.function_id, W.c.state).where(W.c.id == worker_id)).first()
            if row is None:
                raise NotFoundError(f"Worker {worker_id} is not known to this control plane.")
            conn.execute(
                update(W).where(W.c.id == worker_id).values(pid=pid, host=host, last_heartbeat=_now())
            )
        fn = self.function_row(row[0])
        out = {
            k: fn[k]
            for k in (
                "id",
                "app_id",
                "name",
                "parent_id",
                "spec",
                "module",
                "source_name",
                "source_blob",
                "source_dir",
                "pickled_blob",
                "inline_env",
                "version",
            )
        }
        out["inline_env"] = self.secrets.open_env(fn["inline_env"])
        if fn["parent_id"]:
            parent = self.function_row(fn["parent_id"])
            out["parent_name"] = parent["name"]
        out["lease_s"] = self.settings.lease_s
        out["heartbeat_s"] = self.settings.heartbeat_s
        return out

    def worker_ready(self, worker_id: str) -> None:
        fid = self.worker_row(worker_id)["function_id"]
        self._startup_failures.pop(fid, None)
        with self.db.write() as conn:
            conn.execute(
                update(W)
                .where(and_(W.c.id == worker_id, W.c.state == "starting"))
                .values(state="ready", ready_at=_now(), idle_since=_now())
            )
        row = self.worker_row(worker_id)
        self._worker_state(worker_id, fid, row["state"])
        self._prices[worker_id] = row["price_per_hour"] or 0.0
        if row["ready_at"] is not None:
            self.event(
                "worker.ready",
                f"worker {worker_id} ready after {row['ready_at'] - row['started_at']:.2f} s",
                app_id=row["app_id"],
                function_id=row["function_id"],
                worker_id=worker_id,
            )

    def worker_row(self, worker_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(W).where(W.c.id == worker_id)).first()
        if row is None:
            raise NotFoundError(f"Worker {worker_id} not found.")
        return dict(row._mapping)

    def worker_function(self, worker_id: str) -> tuple[str, str]:
        """(function id, state) of a worker, from this process's view when it has one."""
        got = self._workers.get(worker_id)
        if got is None:
            row = self.worker_row(worker_id)
            got = (row["function_id"], row["state"])
            self._workers[worker_id] = got
            self._prices[worker_id] = row["price_per_hour"] or 0.0
        return got

    def _worker_state(self, worker_id: str, function_id: str, state: str) -> None:
        if state == "stopped":
            self._workers.pop(worker_id, None)
            self._prices.pop(worker_id, None)
        else:
            self._workers[worker_id] = (function_id, state)

    def claim(self, worker_id: str, function_id: str, max_n: int) -> list[Any]:
        rows = self.queue.claim(function_id, worker_id, max_n, self.settings.lease_s)
        if len(rows) < max_n:
            self._claimed_empty[function_id] = _now()
        return rows

    def worker_state(self, worker_id: str) -> str | None:
        with self.db.read() as conn:
            return conn.execute(select(W.c.state).where(W.c.id == worker_id)).scalar_one_or_none()

    def post_outputs(self, worker_id: str, items: list[OutputItem]) -> None:
        call_ids, written, retry_at = self.queue.complete_rows(worker_id, items)
        self._deliver(written)
        self.hub.notify(*[f"outputs:{c}" for c in call_ids])
        if retry_at:
            self.hub.notify("reconcile")
            now = _now()
            for fid, at in retry_at.items():
                # a retry's backoff ends with nobody announcing it: wake the function's waiting workers then,
                # rather than leaving it to their periodic re-read (up to a second later)
                self.hub.later(at - now, self.inputs_pending, fid)

    def heartbeat(
        self,
        worker_id: str,
        in_flight: int,
        idle: bool,
        held: list[int] | None = None,
        served: int = 0,
        busy_s: float = 0.0,
    ) -> dict[str, Any]:
        now = _now()
        with self.db.write() as conn:
            row = conn.execute(
                select(W.c.state, W.c.idle_since, W.c.function_id, W.c.function_version).where(
                    W.c.id == worker_id
                )
            ).first()
            if row is None:
                return {"drain": True, "cancel": []}
            if served > 0:
                self._record_service(row[2], served, busy_s)
            idle_since = (row[1] or now) if idle else None
            conn.execute(
                update(W)
                .where(W.c.id == worker_id)
                .values(last_heartbeat=now, in_flight=in_flight, idle_since=idle_since)
            )
        self.queue.renew(worker_id, held or [], self.settings.lease_s, now)
        with self._lock:
            cancel = sorted(self._cancel_requests.pop(worker_id, set()))
        return {"drain": row[0] in ("draining", "stopped"), "cancel": cancel}

    SERVICE_HALF_LIFE = 200  # inputs: the estimate follows a function whose inputs change in length

    def _record_service(self, function_id: str, served: int, busy_s: float) -> None:
        """Fold a heartbeat's (inputs finished, seconds they ran) into the function's service time: an
        average over recent inputs, each heartbeat weighted by how many it reports."""
        mean = max(busy_s, 0.0) / served
        with self._lock:
            prev = self._service.get(function_id)
            if prev is None:
                self._service[function_id] = mean
            else:
                keep = 0.5 ** (served / self.SERVICE_HALF_LIFE)
                self._service[function_id] = keep * prev + (1.0 - keep) * mean

    def service_time_estimate(self, function_id: str) -> float | None:
        """Mean seconds one input of the function runs, as its workers report it (None before any has)."""
        return self._service.get(function_id)

    def drain_worker(self, worker_id: str, reason: str) -> None:
        with self.db.write() as conn:
            conn.execute(
                update(W)
                .where(and_(W.c.id == worker_id, W.c.state.in_(("starting", "ready"))))
                .values(state="draining", stop_reason=reason)
            )
        got = self._workers.get(worker_id)
        if got is not None and got[1] != "stopped":
            self._worker_state(worker_id, got[0], "draining")
        self._unpark_worker(worker_id)  # a draining worker gets no new inputs
        self.hub.notify(f"drain:{worker_id}")

    def _unpark_worker(self, worker_id: str) -> None:
        """Withdraw a worker's parked claims (not those already promised inputs: the worker gets those, or
        releases them, or they requeue with the rest of what it held)."""
        with self._lock:
            for fid in list(self._parked):
                for pc in [pc for pc in self._parked[fid] if pc.worker_id == worker_id and not pc.taken]:
                    _discard(self._parked, fid, pc)

    def worker_stopped(self, worker_id: str, reason: str, *, crashed: bool) -> None:
        """Mark a worker gone and requeue whatever it still held (a crash counts against the input)."""
        with self.db.write() as conn:
            row = conn.execute(
                select(W.c.state, W.c.app_id, W.c.function_id, W.c.stop_reason).where(W.c.id == worker_id)
            ).first()
            if row is None or row[0] == "stopped":
                return
            conn.execute(
                update(W)
                .where(W.c.id == worker_id)
                .values(state="stopped", stopped_at=_now(), stop_reason=row[3] or reason)
            )
        self._unpark_worker(worker_id)  # before requeueing what it held: nothing new reaches it after
        n, dead_calls = self.queue.release_worker(worker_id, crashed=crashed)
        self.tokens.revoke_scope(f"worker:{worker_id}")
        self._worker_state(worker_id, row[2], "stopped")
        self.hub.notify(*[f"outputs:{c}" for c in dead_calls], "reconcile")
        self.inputs_pending(row[2])
        msg = f"worker {worker_id} stopped: {reason}" + (f"; {n} inputs requeued" if n else "")
        self.event(
            "worker.crashed" if crashed else "worker.stopped",
            msg,
            app_id=row[1],
            function_id=row[2],
            worker_id=worker_id,
            requeued=n,
        )
        if reason.startswith("startup failed"):
            self._on_startup_failure(row[1], row[2], reason)

    STARTUP_FAILURE_BUDGET = 3

    def _on_startup_failure(self, app_id: str, function_id: str, reason: str) -> None:
        """Workers that cannot even start would be relaunched forever: after a few in a row, the function's
        waiting inputs end with the start-up error instead of hanging."""
        n = self._startup_failures.get(function_id, 0) + 1
        self._startup_failures[function_id] = n
        if n < self.STARTUP_FAILURE_BUDGET:
            return
        from cloudmodal.exception import ExecutionError
        from cloudmodal.serialization import failure_payload

        err = ExecutionError(
            f"{n} workers in a row failed to start, so the waiting inputs were failed. Last error: {reason.removeprefix('startup failed: ')}. `cloudmodal app logs {app_id}` shows the worker's output."
        )
        calls = self.queue.fail_pending(function_id, failure_payload(err, tb=""))
        self._startup_failures[function_id] = 0
        self.event("function.failed", str(err), app_id=app_id, function_id=function_id)
        self.hub.notify(*[f"outputs:{c}" for c in calls])

    def release_inputs(self, worker_id: str, input_ids: list[int] | None) -> int:
        n, _ = self.queue.release_worker(worker_id, crashed=False, input_ids=input_ids)
        with self.db.read() as conn:
            fid = conn.execute(select(W.c.function_id).where(W.c.id == worker_id)).scalar_one_or_none()
        if fid:
            self.inputs_pending(fid)
        return n

    # -- logs --------------------------------------------------------------------------------------------
    def add_logs(self, worker_id: str, lines: list[list[Any]]) -> None:
        if not lines:
            return
        with self.db.read() as conn:
            row = conn.execute(select(W.c.app_id, W.c.function_id).where(W.c.id == worker_id)).first()
        if row is None:
            return
        with self.db.write() as conn:
            conn.execute(
                L.insert(),
                [
                    dict(
                        app_id=row[0],
                        function_id=row[1],
                        worker_id=worker_id,
                        ts=ts,
                        stream=stream,
                        text=text,
                        call_id=call_id,
                    )
                    for ts, stream, text, call_id in lines
                ],
            )
        self.hub.notify(f"logs:{row[0]}")

    def logs(self, app_id: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(L.c.id, L.c.ts, L.c.stream, L.c.text, L.c.function_id, L.c.worker_id, L.c.call_id)
                .where(and_(L.c.app_id == app_id, L.c.id > after))
                .order_by(L.c.id)
                .limit(limit)
            ).all()
        return [
            dict(id=r[0], ts=r[1], stream=r[2], text=r[3], function_id=r[4], worker_id=r[5], call_id=r[6])
            for r in rows
        ]

    # -- housekeeping ------------------------------------------------------------------------------------
    def stop_abandoned_apps(self) -> None:
        cutoff = _now() - self.settings.client_timeout_s
        with self.db.read() as conn:
            rows = conn.execute(
                select(A.c.id).where(
                    and_(
                        A.c.ephemeral.is_(True),
                        A.c.state == "running",
                        or_(A.c.client_heartbeat_at < cutoff, A.c.client_heartbeat_at.is_(None)),
                    )
                )
            ).all()
        for (app_id,) in rows:
            try:  # one app that cannot be stopped does not keep the others running
                self.stop_app(
                    app_id,
                    reason=f"the client that ran this ephemeral app has been silent for {self.settings.client_timeout_s:.0f} s",
                )
            except Exception:
                if app_id not in self._stop_failed:  # once per app, not every tick
                    self._stop_failed.add(app_id)
                    log.exception("stopping abandoned app %s failed", app_id)


def _view(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in FUNCTION_VIEW}


def _validate_name(name: str, what: str) -> None:
    import re

    if not name or len(name) > 64 or not re.fullmatch(r"[a-zA-Z0-9._-]+", name):
        raise InvalidError(
            f"{what} {name!r} is invalid: use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'."
        )
