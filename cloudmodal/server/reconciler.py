"""The reconciler: applies the autoscaler's pure decisions through a provider, watches workers' health.

One loop, woken early when inputs arrive for a function (so a cold start does not wait for a tick):
1. requeue inputs whose lease expired; stop ephemeral apps whose client went silent;
2. per function with work or workers: snapshot → decision → launch / drain;
3. reap workers whose process exited (a worker that exits without saying goodbye crashed: its inputs are
   requeued at once, counted against their crash budget — never against the user's Retries);
4. replace workers that stopped heartbeating.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select

from cloudmodal.exception import Error, InvalidError, NoProviderError
from cloudmodal.gpu import GpuTier
from cloudmodal.ids import new_id
from cloudmodal.providers.base import SupportsPreemptionNotice
from cloudmodal.providers.gpu import summarize
from cloudmodal.server import models
from cloudmodal.server.autoscaler import Autoscaler, PoolSnapshot, WorkerView, per_worker_target
from cloudmodal.server.db import Leadership
from cloudmodal.server.retention import Pruner
from cloudmodal.server.service import LIVE_WORKER_STATES, ControlPlane
from cloudmodal.server.spot import BlockList, MarketPolicy, MarketSettings, PoolMarketState, StockoutLog
from cloudmodal.server.wire_spec import validate_wire_spec
from cloudmodal.spec import FunctionSpec

log = logging.getLogger("cloudmodal.reconciler")

STANDBY_RETRY_S = 1.0  # how often a standby control plane tries to take over reconciling
F = models.functions
W = models.workers
P = models.pools

MAX_LAUNCH_TRIES = 12  # candidates tried per worker before backing off
LAUNCH_SPACING_S = (0.05, 1.0)  # between tries on one cloud in one walk: first gap, cap (doubling between)
STARTUP_GRACE_S = (
    120.0  # a launched worker that never registers is replaced after this (plus startup_timeout)
)
DRAIN_GRACE_S = 30.0
LAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STARTUP_SAMPLES = 16  # the start-up estimate is the median launch → ready of this many recent workers
MAX_ERROR_CHARS = 400  # of an exception's text in a pool.error event or a log line


class StartupTimes:
    """Launch → ready (``ready_at - started_at``) of each function's most recent workers; the autoscaler's
    start-up estimate is their median (robust to one slow image pull or one instant local start)."""

    def __init__(self, keep: int = STARTUP_SAMPLES) -> None:
        self.keep = max(int(keep), 1)
        self._boots: dict[str, dict[str, float]] = {}  # function id -> worker id -> seconds, oldest first
        self._median: dict[str, float | None] = {}
        # function id -> the latest ready_at taken (older ones are skipped)
        self._newest: dict[str, float] = {}

    def known(self, function_id: str) -> bool:
        return function_id in self._boots

    def seed(self, function_id: str, rows: Iterable[tuple[str, float, float | None]]) -> None:
        """Start a function's history from (worker id, started_at, ready_at) rows, oldest first."""
        self._boots.setdefault(function_id, {})
        for worker_id, started_at, ready_at in rows:
            self.observe(function_id, worker_id, started_at, ready_at)

    def observe(self, function_id: str, worker_id: str, started_at: float, ready_at: float | None) -> None:
        boots = self._boots.setdefault(function_id, {})
        if ready_at is None or worker_id in boots or ready_at < started_at:
            return
        if ready_at < self._newest.get(function_id, -math.inf):
            return  # older than the samples kept (a long-lived worker already counted, or dropped)
        self._newest[function_id] = ready_at
        boots[worker_id] = ready_at - started_at
        while len(boots) > self.keep:
            del boots[next(iter(boots))]
        self._median.pop(function_id, None)

    def estimate(self, function_id: str) -> float | None:
        if function_id in self._median:
            return self._median[function_id]
        xs = sorted((self._boots.get(function_id) or {}).values())
        n = len(xs)
        est = None if n == 0 else xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
        self._median[function_id] = est
        return est


@dataclass
class _Choice:
    """One way to start a worker: a provider, and for clouds the offer and market placement ranked."""

    provider: Any
    tier: GpuTier | None
    offer: Any = None
    market: str = "on-demand"
    price: float = 0.0
    key: Any = None
    tier_index: int = 0  # the tier's place in the function's gpu list

    @property
    def cloud(self) -> str:
        return self.offer.cloud if self.offer is not None else self.provider.name

    def describe(self) -> str:
        if self.offer is None:
            return f"{self.provider.name}" + (f" {self.tier}" if self.tier else " (CPU)")
        o = self.offer
        return (
            f"{o.cloud} {o.zone or o.region} {o.instance_type} {self.tier} {self.market} ${self.price:.2f}/h"
        )


class Reconciler:
    def __init__(self, cp: ControlPlane, providers: Any, server_url: str) -> None:
        self.cp = cp
        if not isinstance(providers, dict):
            providers = {providers.name: providers}
        self.providers: dict[str, Any] = providers
        self.local = providers.get("local")
        self.clouds = [p for name, p in providers.items() if name != "local"]
        self.provider = self.local or next(iter(providers.values()))  # CPU-only work runs here
        self._tables: dict[str, Any] = {}
        self.server_url = server_url
        self.autoscaler = Autoscaler()
        self.startup_times = StartupTimes()
        self.market_policy = MarketPolicy(_market_settings())
        self.market_state: dict[str, PoolMarketState] = {}
        self.blocks = BlockList()
        self.stockouts = StockoutLog()  # capacity failures by class (GPU type, market, cloud), every pool's
        # Launch threads of every pool add blocks while others rank: the block list and stockouts are shared.
        self._block_lock = threading.Lock()
        # function id -> {spot replacement's worker id: the on-demand worker it replaces, drained once it is ready}
        self._replacing: dict[str, dict[str, str]] = {}
        # function id -> the tier its launches last tried (to say when they move on)
        self._tiers: dict[str, int] = {}
        self.handles: dict[str, tuple[Any, Any]] = {}  # worker id -> (provider, handle)
        self._noticed: set[str] = set()
        self._launching: dict[str, int] = {}
        self._od_launching: dict[
            str, int
        ] = {}  # launches forced on-demand (the min_on_demand floor) in flight
        self._launch_failures: dict[str, int] = {}
        self._next_launch_at: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="launch")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self.pruner = Pruner(cp)  # retention: old calls, logs and blobs
        self._lock = threading.Lock()
        self.leadership = Leadership(cp.db)
        self._pool_rows: dict[str, tuple[Any, ...]] = {}  # function id -> what its pool row says now
        self._market_lock = threading.Lock()
        self._floors: dict[str, frozenset[str]] = {}  # function id -> the on-demand floor last set
        # This machine's worker budget: workers beyond the cores only add start-up cost and contention.
        self.max_workers = int(
            os.environ.get("CLOUDMODAL_LOCAL_MAX_WORKERS") or max(4, 2 * (os.cpu_count() or 1))
        )
        self._live_total = 0
        self._served: set[str] = set()  # functions with live workers at the last tick
        self._idle_elsewhere: list[tuple[float, str, str]] = []  # (idle since, worker id, function id)
        # Failures are isolated per pool (and per global step, per worker) and reported once per distinct
        # error, not on every tick: function id -> the error its pool last failed with.
        self._pool_errors: dict[str, str] = {}
        self._step_errors: dict[str, str] = {}  # global step or worker -> the error it last failed with
        self._launch_errors: dict[str, str] = {}  # function id -> the error its last launch crashed with
        self._spec_checks: dict[str, tuple[int, str | None]] = {}  # function id -> (version, why invalid)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    @property
    def is_leader(self) -> bool:
        """Whether this control plane reconciles its database (see :class:`~cloudmodal.server.db.Leadership`)."""
        return self.leadership.holding is True

    def wake(self) -> None:
        self._wake.set()

    def poke(self, function_id: str) -> None:
        """New inputs: wake at once only for a pool without workers (a cold start); pools that have
        workers are rescaled on the next regular tick, which keeps the hot path free of reconcile passes."""
        if function_id not in self._served:
            self._wake.set()

    def stop(self, terminate_workers: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if terminate_workers:
            handles = list(self.handles.items())
            for wid, _ in handles:
                self.cp.drain_worker(wid, "control plane shutting down")
            deadline = time.time() + 5.0
            for wid, (prov, h) in handles:
                while time.time() < deadline and prov.describe(h).alive:
                    time.sleep(0.05)
                prov.terminate(h, grace_s=1.0)
                self.cp.worker_stopped(wid, "control plane shut down", crashed=False)
            for prov in self.providers.values():
                try:
                    prov.close()
                except Exception:
                    log.exception("closing provider %s", prov.name)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        leading: bool | None = None  # unknown until the first try
        try:
            while not self._stop.is_set():
                try:
                    if self.leadership.held():
                        if not leading:  # taking over: what a previous leader left is ours to settle now
                            leading = True
                            with self._market_lock:  # another leader may have written the pools' rows
                                self.market_state.clear()
                                self._pool_rows.clear()
                            self.cp.event(
                                "control_plane.leader", f"{self.server_url} reconciles this database"
                            )
                            self._adopt_orphans()
                        self.tick(time.time())
                    elif leading is not False:
                        leading = False
                        log.info(
                            "another control plane reconciles this database; %s serves the API only",
                            self.server_url,
                        )
                except Exception as e:  # the loop must survive anything; the next tick retries
                    self._failed("tick", e)
                else:
                    self._succeeded("tick")
                self._wake.wait(self.cp.settings.reconcile_interval_s if leading else STANDBY_RETRY_S)
                self._wake.clear()
        finally:
            self.leadership.release()

    def _adopt_orphans(self) -> None:
        """After a restart, workers launched by a previous process keep running and heartbeating; they are
        adopted by heartbeat. Workers that never registered are written off."""
        with self.cp.db.read() as conn:
            rows = conn.execute(select(W.c.id).where(and_(W.c.state == "starting", W.c.pid.is_(None)))).all()
        for (wid,) in rows:
            self._step(
                f"worker {wid} (write-off)",
                self.cp.worker_stopped,
                wid,
                "control plane restarted before the worker registered",
                crashed=False,
            )

    # -- isolation: one failing pool, step or worker never stops the others -----------------------------------
    def _step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run one global step (or one worker's part of it); a failure is logged once per distinct error."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._failed(name, e)
        else:
            self._succeeded(name)

    def _failed(self, name: str, e: BaseException) -> None:
        why = _describe_error(e)
        if self._step_errors.get(name) != why:
            self._step_errors[name] = why
            log.error(
                "reconciler: %s failed (logged again only if the error changes): %s", name, why, exc_info=e
            )

    def _succeeded(self, name: str) -> None:
        if self._step_errors and self._step_errors.pop(name, None) is not None:
            log.info("reconciler: %s works again", name)

    @contextmanager
    def _pool_guard(self, fid: str, name: str, app_id: str | None, failed: set[str]) -> Iterator[None]:
        """Everything done for one pool in a tick runs under this: if it raises, that pool is skipped for this
        tick (and reported once per distinct error); every other pool proceeds."""
        try:
            yield
        except Exception as e:
            failed.add(fid)
            why = _describe_error(e)
            if self._pool_errors.get(fid) == why:
                return
            self._pool_errors[fid] = why
            log.error(
                "reconciler: pool of function %s (%s) skipped, other pools proceed: %s",
                name,
                fid,
                why,
                exc_info=e,
            )
            self._report(
                "pool.error",
                f"function {name}: {why}. Its pool is skipped (no workers start or stop for it) until this is "
                "fixed, e.g. by deploying the function again; other functions are not affected.",
                app_id,
                fid,
            )

    def _note_recoveries(self, fns: dict[str, Any], failed: set[str]) -> None:
        for fid in [f for f in self._pool_errors if f not in failed]:
            del self._pool_errors[fid]
            fn = fns.get(fid)
            if fn is None:  # stopped or gone: nothing to recover
                continue
            log.info("reconciler: pool of function %s (%s) works again", fn[7], fid)
            self._report("pool.recovered", f"function {fn[7]}: its pool works again", fn[1], fid)
        for fid in [f for f in self._spec_checks if f not in fns]:
            del self._spec_checks[fid]

    def _report(self, kind: str, message: str, app_id: str | None, fid: str) -> None:
        try:
            self.cp.event(kind, message, app_id=app_id, function_id=fid)
        except Exception as e:  # the database may be what failed; the log line above still says it
            log.warning("reconciler: could not record %s for %s: %s", kind, fid, _describe_error(e))

    def _check_stored_spec(self, fid: str, fn: Any) -> None:
        """Rows stored before the server validated specs (or written around it) may not hold what the
        autoscaler needs: checked once per version, so that such a pool stops with an error naming the field
        rather than failing somewhere deeper on every tick. Keys this version does not know are ignored."""
        checked = self._spec_checks.get(fid)
        if checked is None or checked[0] != fn[3]:
            try:
                validate_wire_spec(fn[5], ignore_unknown_keys=True)
                checked = (fn[3], None)
            except InvalidError as e:
                checked = (fn[3], str(e))
            self._spec_checks[fid] = checked
        if checked[1] is not None:
            raise InvalidError(f"its stored spec is invalid: {checked[1]}")

    # -- resource checks at function registration ---------------------------------------------------------
    def check_resources(self, spec: FunctionSpec, *, allow_cpu_fallback: bool) -> None:
        if not spec.gpu or allow_cpu_fallback:
            return
        if self._local_tier(spec.gpu) is not None:
            return
        if self._cloud_choices(spec, "", time.time(), ignore_blocks=True, limit=1):
            return
        raise NoProviderError(_no_gpu_message(spec.gpu, self.local))

    def _local_tier(self, tiers: tuple[GpuTier, ...]) -> GpuTier | None:
        can = getattr(self.local, "can_satisfy", None)
        if can is None:
            return None
        for t in tiers:
            if can((t,)):
                return t
        return None

    def _table(self, provider: Any) -> Any:
        table = self._tables.get(provider.name)
        if table is None:
            from cloudmodal.pricing.offers import OfferTable

            offers = provider.offers()
            table = offers if isinstance(offers, OfferTable) else OfferTable(offers)
            self._tables[provider.name] = table
        return table

    def _cloud_choices(
        self,
        spec: FunctionSpec,
        fid: str,
        now: float,
        *,
        ignore_blocks: bool = False,
        force_on_demand: bool = False,
        limit: int = 12,
    ) -> list[_Choice]:
        if not self.clouds or not spec.gpu:
            return []
        from cloudmodal.placement import PlacementPolicy, rank

        state = self._market(fid)
        mode = "never" if force_on_demand else self.market_policy.spot_mode(spec.spot, state, now)
        clouds = None if spec.cloud is None or spec.cloud in ("auto", "sim") else frozenset([spec.cloud])
        policy = PlacementPolicy(
            spot=mode,
            clouds=clouds,
            regions=frozenset(spec.region) or None,
            max_price_per_hour=spec.max_price_per_hour,
        )
        if ignore_blocks:
            blocked: frozenset[Any] = frozenset()
        else:
            with self._block_lock:
                blocked = self.blocks.active(now)
        out: list[_Choice] = []
        for prov in self.clouds:
            placement = rank(spec.gpu, self._table(prov), policy=policy, blocked=blocked, limit=limit)
            out += [
                _Choice(prov, c.tier, c.offer, c.market, c.price, c.key, c.tier_index)
                for c in placement.candidates
            ]
        if len(self.clouds) > 1:
            out.sort(key=lambda c: (c.price,))
        return out[:limit]

    def _choices(
        self, spec: FunctionSpec, fid: str, cpu_fallback: bool, now: float, force_on_demand: bool
    ) -> list[_Choice]:
        """Where to try to start the next worker, best first: this machine when it has the GPU (it costs
        nothing), then cloud offers in placement's order (tiers in the user's order, cheapest first)."""
        if not spec.gpu or cpu_fallback:
            return [_Choice(self.provider, None)]
        out: list[_Choice] = []
        tier = self._local_tier(spec.gpu)
        if tier is not None:
            out.append(_Choice(self.local, tier, tier_index=spec.gpu.index(tier)))
        return out + self._cloud_choices(spec, fid, now, force_on_demand=force_on_demand)

    # -- the loop ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        cp = self.cp
        if now - self._last_housekeeping > 1.0:
            self._last_housekeeping = now
            self._step("requeueing expired leases", self._requeue_expired, now)
            self._step("stopping abandoned apps", cp.stop_abandoned_apps)
            self.pruner.maybe_start(now, self._step)  # about once a minute, on its own thread
        self._step("reaping workers", self._reap, now)
        counts = cp.queue.counts()
        with cp.db.read() as conn:
            fns = {
                r[0]: r
                for r in conn.execute(
                    select(
                        F.c.id,
                        F.c.app_id,
                        F.c.state,
                        F.c.version,
                        F.c.last_active_at,
                        F.c.spec,
                        F.c.inline_env,
                        F.c.name,
                    ).where(F.c.state == "active")
                ).all()
            }
            workers = conn.execute(select(W).where(W.c.state.in_(LIVE_WORKER_STATES))).all()
        by_fn: dict[str, list[Any]] = {}
        for w in workers:
            by_fn.setdefault(w.function_id, []).append(w)
        self._live_total = len(workers) + sum(self._launching.values())
        self._served = {w.function_id for w in workers if w.state in ("starting", "ready")}
        self._idle_elsewhere = sorted(
            (w.idle_since, w.id, w.function_id)
            for w in workers
            if w.state == "ready" and w.idle_since is not None
        )
        failed: set[str] = set()  # pools that raised in this tick
        # Workers of stopped functions, or of an older version after a redeploy, drain.
        for fid, ws in by_fn.items():
            fn = fns.get(fid)
            with self._pool_guard(fid, fn[7] if fn else fid, fn[1] if fn else ws[0].app_id, failed):
                for w in ws:
                    if w.state == "draining":
                        continue
                    if fn is None:
                        cp.drain_worker(w.id, "app stopped")
                    elif w.function_version < fn[3]:
                        cp.drain_worker(w.id, f"replaced by version {fn[3]}")
        for fid, fn in fns.items():
            with self._pool_guard(fid, fn[7], fn[1], failed):
                self._reconcile_pool(fid, fn, counts.get(fid, (0, 0)), by_fn.get(fid, []), now)
        self._note_recoveries(fns, failed)

    def _requeue_expired(self, now: float) -> None:
        _, dead_calls = self.cp.queue.requeue_expired(now)
        if dead_calls:
            self.cp.hub.notify(*[f"outputs:{c}" for c in dead_calls])

    def _reconcile_pool(
        self, fid: str, fn: Any, counts: tuple[int, int], workers: list[Any], now: float
    ) -> None:
        pending, running = counts
        self._check_stored_spec(fid, fn)
        spec = self.cp.spec_of(fid)
        ws = [w for w in workers if w.function_version >= fn[3]]
        if not (pending or running or ws or spec.autoscaler.min_containers or self._launching.get(fid)):
            return
        self._scale(fid, fn, spec, pending, running, ws, now)

    def _scale(
        self, fid: str, fn: Any, spec: FunctionSpec, pending: int, running: int, ws: list[Any], now: float
    ) -> None:
        target = per_worker_target(spec.concurrency, spec.batching)
        self._settle_replacements(fid, fn, ws)
        floor_ids = self._on_demand_floor(fid, spec, ws)
        views = [
            WorkerView(
                worker_id=w.id,
                state=w.state,
                started_at=w.started_at,
                idle_since=w.idle_since,
                in_flight=w.in_flight,
                price_per_hour=w.price_per_hour or 0.0,
                floor=w.id in floor_ids,
            )
            for w in ws
        ]
        launching = self._launching.get(fid, 0)
        views += [
            WorkerView(
                worker_id=f"launching-{i}", state="starting", started_at=now, idle_since=None, in_flight=0
            )
            for i in range(launching)
        ]
        snap = PoolSnapshot(
            backlog=pending,
            in_flight=running,
            workers=views,
            last_active_at=fn[4],
            settings=spec.autoscaler,
            per_worker_target=target,
            service_time_s=self._service_time(fid),
            startup_s=self._startup_time(fid, ws),
        )
        decision = self.autoscaler.decide(snap, now)
        for wid in decision.terminate:
            if not wid.startswith("launching-"):
                self.cp.drain_worker(wid, "scaled down: idle past scaledown_window")
                self.cp.event(
                    "pool.scale_down",
                    f"draining idle worker {wid}",
                    app_id=fn[1],
                    function_id=fid,
                    worker_id=wid,
                )
        launch = decision.launch
        room = self.max_workers - self._live_total
        if launch > room:
            # Make room by stopping workers that sit idle in other pools (longest idle first).
            for _since, wid, other in list(self._idle_elsewhere):
                if room >= launch:
                    break
                if other == fid:
                    continue
                self._idle_elsewhere.remove((_since, wid, other))
                self.cp.drain_worker(
                    wid,
                    f"idle; this machine's {self.max_workers}-worker budget is needed by another function",
                )
            launch = max(0, room)
        if launch > 0 and now >= self._next_launch_at.get(fid, 0.0):
            self._live_total += launch
            live_od = sum(
                1 for w in ws if w.market == "on-demand" and w.state != "draining" and w.provider != "local"
            ) + self._od_launching.get(fid, 0)
            floor = (
                self.market_policy.on_demand_floor(spec.min_on_demand, live_od)
                if spec.gpu and self.clouds
                else 0
            )
            self.cp.event(
                "pool.scale_up",
                f"launching {launch} worker(s): {decision.reason}",
                app_id=fn[1],
                function_id=fid,
                desired=decision.desired,
            )
            for i in range(launch):
                self._launch(fid, fn, spec, force_on_demand=i < floor)
        elif spec.gpu and self.clouds and spec.spot == "allow" and not self._launching.get(fid) and room > 0:
            self._move_back_to_spot(fid, fn, spec, ws, now)
        # after the launches: the row is not on a cold start's path
        self._record_pool(fid, fn[1], decision, len(ws), now)

    def _on_demand_floor(self, fid: str, spec: FunctionSpec, ws: list[Any]) -> frozenset[str]:
        """The pool's ``min_on_demand`` floor: its cheapest (then oldest) live on-demand cloud workers. The
        autoscaler stops them last, and the control plane hands them inputs first: they are paid for whether
        they work or not, so work they take lets a spot worker go idle and stop."""
        floor: frozenset[str] = frozenset()
        if spec.min_on_demand and spec.gpu and self.clouds:
            od = sorted(
                (
                    w
                    for w in ws
                    if w.market == "on-demand" and w.provider != "local" and w.state in ("starting", "ready")
                ),
                key=lambda w: (w.price_per_hour or 0.0, w.started_at),
            )
            floor = frozenset(w.id for w in od[: spec.min_on_demand])
        if self._floors.get(fid, frozenset()) != floor:  # tell the control plane what changed, only
            self.cp.set_floor(fid, floor)
            self._floors[fid] = floor
        return floor

    # -- the pool's row --------------------------------------------------------------------------------------
    def _market(self, fid: str) -> PoolMarketState:
        """The pool's market history: in memory, or (first use after a start or a take-over) its row's."""
        state = self.market_state.get(fid)
        if state is None:
            with self._market_lock:  # launch threads ask too: load once, share one state
                state = self.market_state.get(fid)
                if state is None:
                    with self.cp.db.read() as conn:
                        wire = conn.execute(select(P.c.market_state).where(P.c.function_id == fid)).scalar()
                    state = PoolMarketState.from_wire(wire) if wire else PoolMarketState()
                    self.market_state[fid] = state
        return state

    def _record_pool(self, fid: str, app_id: str, decision: Any, live: int, now: float) -> None:
        """Write the pool's row when what it says changed: the decision (desired, live workers) or the market
        history. The reason is written with them (it is formatted only then)."""
        market = self._market(fid)
        key = (decision.desired, live, market.fingerprint())
        if self._pool_rows.get(fid) == key:
            return
        values = dict(
            app_id=app_id,
            desired=decision.desired,
            workers=live,
            reason=decision.reason,
            fallen_back=market.fallen_back,
            market_state=market.to_wire(),
            updated_at=now,
        )
        with self.cp.db.write() as conn:
            if conn.execute(P.update().where(P.c.function_id == fid).values(**values)).rowcount == 0:
                conn.execute(P.insert().values(function_id=fid, **values))
        self._pool_rows[fid] = key

    def _startup_time(self, fid: str, ws: list[Any]) -> float | None:
        """Median launch → ready of the function's recent workers (None before the first is ready). Seeded
        from the database the first time a function is seen, so a restart keeps its history."""
        times = self.startup_times
        if not times.known(fid):
            with self.cp.db.read() as conn:
                rows = conn.execute(
                    select(W.c.id, W.c.started_at, W.c.ready_at)
                    .where(and_(W.c.function_id == fid, W.c.ready_at.is_not(None)))
                    .order_by(W.c.ready_at.desc())
                    .limit(times.keep)
                ).all()
            times.seed(fid, reversed([tuple(r) for r in rows]))
        for w in sorted((w for w in ws if w.ready_at is not None), key=lambda w: w.ready_at):
            times.observe(fid, w.id, w.started_at, w.ready_at)
        return times.estimate(fid)

    def _service_time(self, fid: str) -> float | None:
        """Mean seconds per input on one slot, as the function's workers report it (None until they have)."""
        return self.cp.service_time_estimate(fid)

    def _move_back_to_spot(self, fid: str, fn: Any, spec: FunctionSpec, ws: list[Any], now: float) -> None:
        """A pool fallen back to on-demand probes spot now and then with one extra worker; once spot works
        again its on-demand workers above ``min_on_demand`` are replaced by spot ones, one at a time."""
        state = self._market(fid)
        live = [w for w in ws if w.state != "draining" and w.provider != "local"]
        if not any(w.market == "on-demand" for w in live):
            return
        if state.fallen_back:
            if self.market_policy.probe_due(state, now):
                self.cp.event(
                    "pool.spot_probe",
                    "trying spot again with one extra worker",
                    app_id=fn[1],
                    function_id=fid,
                )
                self._launch(fid, fn, spec)
            return
        spot = next((c for c in self._cloud_choices(spec, fid, now) if c.market == "spot"), None)
        if spot is None:
            return
        # Workers whose replacement is on its way are gone, for to_replace (and not replaced twice).
        leaving = set(self._replacing.get(fid, {}).values())
        for wid in self.market_policy.to_replace(
            state,
            [(w.id, w.market, w.price_per_hour) for w in live if w.id not in leaving],
            spec.min_on_demand,
            spot.price,
            now,
        ):
            new = self._launch(fid, fn, spec)
            self._replacing.setdefault(fid, {})[new] = wid
            self.cp.event(
                "pool.rebalance",
                f"replacing on-demand worker {wid} by spot ({spot.describe()}): launching {new}; {wid} keeps "
                "serving until it is ready",
                app_id=fn[1],
                function_id=fid,
                worker_id=wid,
                replacement=new,
            )

    def _settle_replacements(self, fid: str, fn: Any, ws: list[Any]) -> None:
        """Drain each on-demand worker whose spot replacement is ready (not before: the pool would be short
        while the replacement boots); forget replacements that failed or stopped first (the worker stays)."""
        pending = self._replacing.get(fid)
        if not pending:
            return
        by_id = {w.id: w for w in ws}
        for new, old in list(pending.items()):
            w = by_id.get(new)
            state = w.state if w is not None else self.cp.worker_state(new)
            if state == "starting":
                continue
            del pending[new]
            o = by_id.get(old)
            if state != "ready" or w is None or w.market != "spot" or o is None:
                continue  # failed, stopped, scaled down, came up on demand, or the old one is gone already
            if o.state in ("starting", "ready"):
                self.cp.drain_worker(old, "replaced by a cheaper spot worker")
                self.cp.event(
                    "pool.rebalanced",
                    f"spot worker {new} is ready: draining on-demand worker {old}",
                    app_id=fn[1],
                    function_id=fid,
                    worker_id=old,
                    replacement=new,
                )
        if not pending:
            self._replacing.pop(fid, None)

    def _launch(self, fid: str, fn: Any, spec: FunctionSpec, *, force_on_demand: bool = False) -> str:
        """Start one worker in the background (walking the candidates); returns its worker id."""
        from cloudmodal.placement import walk
        from cloudmodal.providers.base import LaunchRequest

        app_id = fn[1]
        cpu_fallback = self.cp.secrets.open_env(fn[6]).get("CLOUDMODAL_CPU_FALLBACK") == "1"
        worker_id = new_id("ta")
        token = self.cp.tokens.create(scope=f"worker:{worker_id}", name=worker_id)
        image = spec.image or {}
        env = {
            "CLOUDMODAL_SERVER_URL": self.server_url,
            "CLOUDMODAL_TOKEN": token,
            "CLOUDMODAL_WORKER_ID": worker_id,
            "CLOUDMODAL_FUNCTION_ID": fid,
            "CLOUDMODAL_APP_ID": app_id,
            "CLOUDMODAL_WORKER_RECONNECT_S": f"{self.cp.settings.worker_reconnect_s:g}",
            "PYTHONUNBUFFERED": "1",
        }
        self.cp.add_worker(worker_id, app_id, fid, provider="-", market="", function_version=fn[3])
        # counted once the launch is certain to run (a failure above must not leave the pool counted busy)
        with self._lock:
            self._launching[fid] = self._launching.get(fid, 0) + 1
        if force_on_demand:
            with self._lock:
                self._od_launching[fid] = self._od_launching.get(fid, 0) + 1

        def go() -> None:
            tried: list[str] = []
            try:  # everything, so that a failure anywhere still settles the launch count and the worker row
                state = self._market(fid)
                ranked_once = False

                def ranked() -> list[_Choice]:
                    # Ranked afresh whenever the walk runs out of candidates: blocks added meanwhile (by this
                    # walk or a concurrent one) take the offers and classes out of stock off the list.
                    nonlocal ranked_once
                    choices = self._choices(spec, fid, cpu_fallback, time.time(), force_on_demand)
                    if not ranked_once and (len(choices) > 1 or (choices and choices[0].offer is not None)):
                        top = "; ".join(f"{i + 1}) {c.describe()}" for i, c in enumerate(choices[:3]))
                        self.cp.event(
                            "placement.ranked",
                            f"worker {worker_id}: {len(choices)} candidates for gpu={','.join(str(t) for t in spec.gpu)}"
                            + (" (on-demand floor)" if force_on_demand else "")
                            + f": {top}",
                            app_id=app_id,
                            function_id=fid,
                            worker_id=worker_id,
                        )
                    ranked_once = True
                    return choices

                def blocked(c: _Choice) -> bool:
                    if c.key is None:
                        return False
                    with self._block_lock:
                        return c.key in self.blocks.active(time.time())

                per_cloud: dict[str, int] = {}  # failed tries of this walk on each cloud
                for choice in walk(ranked, _choice_key, blocked, MAX_LAUNCH_TRIES):
                    failures_here = per_cloud.get(choice.cloud, 0)
                    if failures_here:  # no hot loops on one cloud (clouds rate-limit launches per account)
                        first, cap = LAUNCH_SPACING_S
                        time.sleep(min(first * 2 ** (failures_here - 1), cap))
                    self._note_tier(fid, app_id, spec, choice, worker_id)
                    req = LaunchRequest(
                        worker_id=worker_id,
                        app_id=app_id,
                        function_id=fid,
                        gpu=choice.tier,
                        offer=choice.offer,
                        market=choice.market,
                        cpu=spec.cpu,
                        memory_mb=spec.memory,
                        image_hash=spec.image_hash,
                        pip_packages=tuple(image.get("pip_packages") or ()),
                        env=env,
                        argv=("-m", "cloudmodal.worker"),
                    )
                    try:
                        handle = choice.provider.launch(req)
                    except Error as e:
                        per_cloud[choice.cloud] = failures_here + 1
                        reason = getattr(e, "reason", None) or type(e).__name__
                        tried.append(f"{choice.describe()}: {reason}")
                        if choice.key is not None:
                            self._block_after_failure(fid, app_id, choice, e, reason)
                        if choice.market == "spot":
                            msg = self.market_policy.record_spot_failure(state, time.time())
                            if msg:
                                self.cp.event("pool.spot_fallback", msg, app_id=app_id, function_id=fid)
                        self.cp.event(
                            "launch.failed",
                            f"{choice.describe()}: {type(e).__name__} ({reason}): {e}"
                            + ("; trying the next candidate" if len(tried) < MAX_LAUNCH_TRIES else ""),
                            app_id=app_id,
                            function_id=fid,
                            worker_id=worker_id,
                            offer=_offer_dict(choice),
                            reason=reason,
                        )
                        continue
                    if choice.key is not None:
                        with self._block_lock:
                            self.market_policy.record_launch_success(self.stockouts, choice.key)
                    self._launched(
                        fid, app_id, worker_id, choice, handle, state, cpu_fallback and bool(spec.gpu)
                    )
                    return
                n = self._launch_failures.get(fid, 0)
                self._launch_failures[fid] = n + 1
                delay = LAUNCH_BACKOFF_S[min(n, len(LAUNCH_BACKOFF_S) - 1)]
                self._next_launch_at[fid] = time.time() + delay
                why = "; ".join(tried[-5:]) or "no candidate offers (all blocked or none match)"
                self.cp.worker_stopped(worker_id, f"launch failed: {why}", crashed=False)
                self.cp.event(
                    "launch.exhausted",
                    f"no candidate could start a worker ({len(tried)} tried); retrying in {delay:g} s. {why}",
                    app_id=app_id,
                    function_id=fid,
                )
            except Exception as e:  # a provider bug must not kill the loop
                self._next_launch_at[fid] = time.time() + 5.0
                why = _describe_error(e)
                if self._launch_errors.get(fid) != why:  # once per distinct error, not every retry
                    self._launch_errors[fid] = why
                    log.error("launch for function %s crashed: %s", fid, why, exc_info=e)
                    self._report("launch.crashed", f"starting a worker crashed: {why}", app_id, fid)
                try:
                    self.cp.worker_stopped(worker_id, f"launch crashed: {why}", crashed=False)
                except Exception as e2:
                    log.warning("could not write off worker %s: %s", worker_id, _describe_error(e2))
            finally:
                with self._lock:
                    self._launching[fid] = max(0, self._launching.get(fid, 1) - 1)
                    if force_on_demand:
                        self._od_launching[fid] = max(0, self._od_launching.get(fid, 1) - 1)

        self._pool.submit(go)
        return worker_id

    def _block_after_failure(self, fid: str, app_id: str, choice: _Choice, e: Error, reason: str) -> None:
        """Block what a failed launch rules out: the offer, its quota scope, and (rule 5 of
        :mod:`cloudmodal.server.spot`) the class of offers a run of capacity failures shows out of stock."""
        from cloudmodal.providers.base import NoCapacityError, QuotaExceededError

        now = time.time()
        quota = isinstance(e, QuotaExceededError)
        with self._block_lock:
            self.market_policy.block_failed_launch(
                self.blocks,
                choice.key,
                now,
                f"{type(e).__name__}: {reason}",
                quota=quota,
                offers=self._table(choice.provider) if quota else (),
            )
            if not isinstance(e, NoCapacityError):
                return
            classes = self.market_policy.record_stockout(
                self.stockouts, self.blocks, choice.key, now, self._cloud_offers()
            )
        for c, until, why in classes:
            self.cp.event(
                "placement.class_blocked",
                f"{c.describe()} blocked for {until - now:.0f} s: {why}; launches skip its offers until then",
                app_id=app_id,
                function_id=fid,
                gpu=c.gpu,
                market=c.market,
                cloud=c.cloud,
                until=until,
            )

    def _cloud_offers(self) -> list[Any]:
        """Every offer the enabled clouds sell (what a class block covers)."""
        return [o for prov in self.clouds for o in self._table(prov).offers]

    def _note_tier(self, fid: str, app_id: str, spec: FunctionSpec, choice: _Choice, worker_id: str) -> None:
        """Say (once per move) when a pool's launches move on to a later tier, and why: the classes of the
        earlier tiers that are blocked."""
        ti = choice.tier_index
        with self._lock:
            prev = self._tiers.get(fid, 0)
            if ti == prev:
                return
            self._tiers[fid] = ti
        if ti < prev or not spec.gpu:  # back to an earlier tier: worker.launched says where
            return
        skipped = spec.gpu[:ti]
        types = {t.type for t in skipped}
        with self._block_lock:
            classes = [(c, why) for c, _until, why in self.stockouts.active(time.time()) if c.gpu in types]
        because = (
            "; ".join(f"{c.describe()} blocked ({why})" for c, why in classes)
            or "every candidate of it is blocked or was tried"
        )
        self.cp.event(
            "placement.next_tier",
            f"worker {worker_id}: gpu {', '.join(str(t) for t in skipped)} is out of stock ({because}); "
            f"moving on to tier {ti + 1}, {choice.tier}: {choice.describe()}",
            app_id=app_id,
            function_id=fid,
            worker_id=worker_id,
            tier=str(choice.tier),
            tier_index=ti,
            blocked=[c.describe() for c, _ in classes],
        )

    def _launched(
        self,
        fid: str,
        app_id: str,
        worker_id: str,
        choice: _Choice,
        handle: Any,
        state: PoolMarketState,
        cpu_fallback: bool,
    ) -> None:
        self._launch_failures.pop(fid, None)
        self._launch_errors.pop(fid, None)
        with self._lock:
            self.handles[worker_id] = (choice.provider, handle)
        if choice.market == "spot":
            msg = self.market_policy.record_spot_success(state, time.time())
            if msg:
                self.cp.event("pool.spot_restored", msg, app_id=app_id, function_id=fid)
        with self.cp.db.write() as conn:
            conn.execute(
                W.update()
                .where(W.c.id == worker_id)
                .values(
                    provider=choice.provider.name,
                    instance_id=handle.instance_id,
                    price_per_hour=handle.price_per_hour,
                    market=handle.market,
                    gpu=str(choice.tier) if choice.tier else None,
                    offer=_offer_dict(choice),
                )
            )
        self.cp.event(
            "worker.launched",
            f"worker {worker_id} launched: {choice.describe()}" + (" (CPU fallback)" if cpu_fallback else ""),
            app_id=app_id,
            function_id=fid,
            worker_id=worker_id,
            offer=_offer_dict(choice),
            market=handle.market,
            price_per_hour=handle.price_per_hour,
        )

    def _reap(self, now: float) -> None:
        for wid, (prov, handle) in list(self.handles.items()):
            self._step(f"worker {wid} (reap)", self._reap_one, wid, prov, handle, now)
        # Workers that went silent (hung, partitioned, or launched by a previous control plane and gone).
        cutoff = now - self.cp.settings.worker_timeout_s
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(W.c.id, W.c.state, W.c.last_heartbeat, W.c.pid, W.c.started_at).where(
                    W.c.state.in_(LIVE_WORKER_STATES)
                )
            ).all()
        for wid, state, last_hb, _pid, started_at in rows:
            self._step(
                f"worker {wid} (heartbeat)", self._check_silent, wid, state, last_hb, started_at, now, cutoff
            )
        if self._step_errors:  # forget the failures of workers that are gone
            known = set(self.handles) | {r[0] for r in rows}
            for key in [
                k for k in self._step_errors if k.startswith("worker ") and k.split()[1] not in known
            ]:
                del self._step_errors[key]

    def _reap_one(self, wid: str, prov: Any, handle: Any, now: float) -> None:
        status = prov.describe(handle)
        if status.alive:
            if isinstance(prov, SupportsPreemptionNotice) and wid not in self._noticed:
                at = prov.preemption_notice(handle)
                if at is not None:
                    self._noticed.add(wid)
                    self._on_preemption_notice(wid, handle, at, now)
            return
        with self._lock:
            self.handles.pop(wid, None)
        state = self.cp.worker_state(wid)
        if state in (None, "stopped"):
            return
        if status.state == "preempted" or wid in self._noticed:
            self._noticed.discard(wid)
            self.cp.worker_stopped(
                wid, f"preempted ({status.detail or 'spot capacity reclaimed'})", crashed=False
            )
            return
        clean = state == "draining" and status.returncode == 0
        self.cp.worker_stopped(
            wid,
            f"process exited with code {status.returncode}"
            + (f" ({status.detail})" if status.detail else ""),
            crashed=not clean,
        )

    def _check_silent(
        self, wid: str, state: str, last_hb: float, started_at: float, now: float, cutoff: float
    ) -> None:
        if wid in self.handles and state == "starting" and now - started_at < STARTUP_GRACE_S:
            return
        if state == "draining" and last_hb < now - DRAIN_GRACE_S - self.cp.settings.worker_timeout_s:
            self._kill(wid)
            self.cp.worker_stopped(wid, "did not finish draining in time", crashed=False)
        elif last_hb < cutoff and (state != "starting" or now - started_at > STARTUP_GRACE_S):
            self._kill(wid)
            self.cp.worker_stopped(wid, f"no heartbeat for {now - last_hb:.0f} s", crashed=True)

    def _on_preemption_notice(self, wid: str, handle: Any, at: float, now: float) -> None:
        """A spot worker will be reclaimed: it stops claiming, its inputs go back to the queue at once (not
        after a lease), and the autoscaler, no longer counting it, starts a replacement right away."""
        row = self.cp.worker_row(wid)
        fid = row["function_id"]
        self.cp.drain_worker(wid, f"preemption notice: reclaimed in {max(0.0, at - now):.0f} s")
        n = self.cp.release_inputs(wid, None)
        self.cp.event(
            "worker.preempted",
            f"worker {wid} ({row.get('gpu') or ''} {row.get('market')}) got a preemption notice; {n} inputs requeued; replacing it",
            app_id=row["app_id"],
            function_id=fid,
            worker_id=wid,
            requeued=n,
        )
        with self.cp.db.read() as conn:
            spot_workers = conn.execute(
                select(func.count())
                .select_from(W)
                .where(
                    and_(W.c.function_id == fid, W.c.market == "spot", W.c.state.in_(("starting", "ready")))
                )
            ).scalar_one()
        state = self._market(fid)
        offer = getattr(handle, "offer", None)
        key = offer.key(handle.market) if offer is not None and hasattr(offer, "key") else None
        msg = self.market_policy.record_preemption(state, now, spot_workers + 1, offer=key)
        if key is not None and self.market_policy.reclaimed(state, key, now):
            assert offer is not None  # key is only set from an offer
            # One offer keeps losing this pool's workers: treat its spot capacity as gone for a while.
            with self._block_lock:
                until = self.market_policy.block_failed_launch(
                    self.blocks, key, now, "spot capacity keeps being reclaimed"
                )
            self.cp.event(
                "offer.blocked",
                f"{offer.cloud} {offer.zone or offer.region} {offer.instance_type} spot blocked for {until - now:.0f} s: its workers keep being preempted",
                app_id=row["app_id"],
                function_id=fid,
            )
        if msg:
            self.cp.event("pool.spot_fallback", msg, app_id=row["app_id"], function_id=fid)
        self.wake()

    def _kill(self, wid: str) -> None:
        entry = self.handles.pop(wid, None)
        if entry is not None:
            try:
                entry[0].terminate(entry[1], grace_s=2.0)
            except Exception:
                log.exception("terminate failed")


def _describe_error(e: BaseException) -> str:
    """An exception as one bounded line (type and message): what events and logs say about a failure."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _no_gpu_message(tiers: tuple[GpuTier, ...], provider: Any) -> str:
    want = ", ".join(str(t) for t in tiers)
    have = ""
    inv = getattr(provider, "gpu_inventory", None)
    if inv is not None:
        try:
            have = summarize(inv())
        except Exception:
            have = "unknown"
    lines = [
        f"No enabled provider can run gpu={want!r}: this machine has {have or 'no GPUs'} and no cloud is enabled."
    ]
    offers = _cheapest_offers(tiers)
    if offers:
        lines.append("Cheapest cloud offers for it:")
        lines.extend(f"  {o}" for o in offers)
    lines.append(
        "To run it: enable a cloud (`pip install 'cloudmodal[aws]'` and configure credentials), "
        "or pass `--gpu-fallback cpu` to `cloudmodal run` (or set CLOUDMODAL_GPU_FALLBACK=cpu) to run it on CPU "
        "for development."
    )
    return "\n".join(lines)


def _cheapest_offers(tiers: tuple[GpuTier, ...], n: int = 3) -> list[str]:
    try:
        from cloudmodal.placement import PlacementPolicy, rank
        from cloudmodal.pricing.catalog import load_offer_table
    except ImportError:
        return []
    try:
        table = load_offer_table()
        placement = rank(tiers, table, policy=PlacementPolicy())
    except Error:
        return ["(no price catalog here: run `cloudmodal pricing refresh` to see cloud offers)"]
    except Exception:
        return []
    out = []
    for c in placement.candidates[:n]:
        o = c.offer
        out.append(f"{c.tier} on {o.cloud} {o.region} {o.instance_type}: ${c.price:.2f}/h ({c.market})")
    return out


def _choice_key(c: _Choice) -> Any:
    """What a walk tries at most once: the offer in its market, or the provider and tier without an offer."""
    return c.key if c.key is not None else (c.provider.name, str(c.tier))


def _offer_dict(choice: _Choice) -> dict[str, Any] | None:
    o = choice.offer
    if o is None:
        return {"cloud": choice.provider.name, "gpu": str(choice.tier) if choice.tier else None}
    return {
        "cloud": o.cloud,
        "region": o.region,
        "zone": o.zone,
        "instance_type": o.instance_type,
        "gpu": str(choice.tier),
        "market": choice.market,
        "price_per_hour": choice.price,
    }


def _market_settings() -> MarketSettings:
    """Spot policy thresholds; ``CLOUDMODAL_SPOT_SETTINGS`` (JSON, e.g. ``{"probe_interval_s": 30}``) overrides."""
    import json

    raw = os.environ.get("CLOUDMODAL_SPOT_SETTINGS")
    if not raw:
        return MarketSettings()
    try:
        return MarketSettings(**json.loads(raw))
    except (ValueError, TypeError) as e:
        from cloudmodal.exception import InvalidError

        raise InvalidError(
            f"CLOUDMODAL_SPOT_SETTINGS is not valid: {e}. Example: '{{\"probe_interval_s\": 30}}'."
        ) from None
