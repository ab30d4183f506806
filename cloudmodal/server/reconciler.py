"""The reconciler: applies the autoscaler's pure decisions through providers, watches workers' health.

One loop, woken early when inputs arrive for a function (so a cold start does not wait for a tick); each
:meth:`Reconciler.tick` (callable on its own, with the caller's ``now``):

1. requeues inputs whose lease expired; stops ephemeral apps whose client went silent;
2. reaps workers whose process exited and replaces workers that stopped heartbeating
   (:mod:`cloudmodal.server.health`);
3. per function with work or workers: snapshot → the autoscaler's decision → launches
   (:mod:`cloudmodal.server.launcher`) and drains, with the pool's on-demand floor and moves back to spot
   decided by :mod:`cloudmodal.server.scaling_rules`.

The reconciler's parts share its state (:class:`~cloudmodal.server.reconciler_base.ReconcilerBase`); time
comes from its ``clock``, its settings from ``settings`` (:meth:`ReconcilerSettings.from_env` by default),
and launches run on its ``executor``, so a test drives single ticks against a fake provider.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.offers import SPOT
from cloudmodal.server import models
from cloudmodal.server.autoscaler import PoolSnapshot, WorkerView, per_worker_target
from cloudmodal.server.estimates import STARTUP_SAMPLES, Estimates, StartupTimes
from cloudmodal.server.health import DRAIN_GRACE_S, STARTUP_GRACE_S, Health
from cloudmodal.server.launcher import Launcher, _Choice
from cloudmodal.server.reconciler_base import (
    MAX_ERROR_CHARS,
    ReconcilerSettings,
    describe_error,
)
from cloudmodal.server.scaling_rules import (
    LAUNCH_BACKOFF_S,
    LAUNCH_SPACING_S,
    MAX_LAUNCH_TRIES,
    PoolWorker,
    move_back_to_spot,
    on_demand_floor,
    on_demand_launches,
    settle_replacements,
)
from cloudmodal.server.service import LIVE_WORKER_STATES
from cloudmodal.server.states import FunctionState, WorkerState
from cloudmodal.server.wire_spec import validate_wire_spec
from cloudmodal.spec import FunctionSpec

__all__ = [
    "DRAIN_GRACE_S",
    "LAUNCH_BACKOFF_S",
    "LAUNCH_SPACING_S",
    "MAX_ERROR_CHARS",
    "MAX_LAUNCH_TRIES",
    "STARTUP_GRACE_S",
    "STARTUP_SAMPLES",
    "Reconciler",
    "ReconcilerSettings",
    "StartupTimes",
]

log = logging.getLogger("cloudmodal.reconciler")

STANDBY_RETRY_S = 1.0  # how often a standby control plane tries to take over reconciling
INVENTORY_INTERVAL_S = 60.0  # how often every provider is asked which machines it runs for this control plane
F = models.functions
W = models.workers
P = models.pools


# what a tick reads of each live worker (not its offer, whose JSON would be decoded for every worker every tick)
TICK_WORKER_COLUMNS = (
    W.c.id,
    W.c.app_id,
    W.c.function_id,
    W.c.provider,
    W.c.state,
    W.c.function_version,
    W.c.started_at,
    W.c.ready_at,
    W.c.idle_since,
    W.c.in_flight,
    W.c.market,
    W.c.price_per_hour,
)
# a tick's share of the reconciler thread's time at most: with many workers a tick costs more, and the loop
# waits longer after it, so the reconciler never takes more than this of the process's one Python core
# (a cold start's poke still wakes it at once)
MAX_DUTY = 0.1


def _pool_worker(w: Any) -> PoolWorker:
    """A worker row as the scaling rules see it."""
    return PoolWorker(
        w.id, w.state, w.market, w.price_per_hour or 0.0, w.started_at, cloud=w.provider != "local"
    )


class Reconciler(Launcher, Health, Estimates):
    """The reconcile loop of one control plane: ``Reconciler(cp, providers, server_url, *, clock=time.time,
    settings=None, executor=None, sleep=time.sleep)`` (see
    :class:`~cloudmodal.server.reconciler_base.ReconcilerBase`)."""

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    @property
    def is_leader(self) -> bool:
        """Whether this control plane reconciles its database (see :class:`~cloudmodal.server.db.Leadership`)."""
        return self.leadership.holding is True

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
            # Launches in flight end at their next candidate (see Launcher._launch) and are waited for, so
            # that a node a cloud is creating right now is recorded, and terminated below with the rest.
            self._pool.shutdown(wait=True, cancel_futures=True)
            handles = list(self.handles.items())
            for wid, _ in handles:
                self.cp.workers.drain_worker(wid, "control plane shutting down")
            deadline = time.monotonic() + 5.0  # a real wait, whatever the clock says
            for wid, (prov, h) in handles:
                while time.monotonic() < deadline and prov.describe(h).alive:
                    time.sleep(0.05)
                prov.terminate(h, grace_s=1.0)
                self.cp.workers.worker_stopped(wid, "control plane shut down", crashed=False)
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
                busy = 0.0
                try:
                    if self.leadership.held():
                        if not leading:  # taking over: what a previous leader left is ours to settle now
                            took_over_at = time.time()
                            leading = True
                            with self._market_lock:  # another leader may have written the pools' rows
                                self.market_state.clear()
                                self._pool_rows.clear()
                            self.cp.activity.event(
                                "control_plane.leader", f"{self.server_url} reconciles this database"
                            )
                            self._adopt_orphans(before=took_over_at)
                        started = time.monotonic()
                        self.tick(self.clock())
                        busy = time.monotonic() - started
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
                if leading:
                    self._wake.wait(
                        max(self.cp.settings.reconcile_interval_s, busy * (1 - MAX_DUTY) / MAX_DUTY)
                    )
                else:
                    self._wake.wait(STANDBY_RETRY_S)
                self._wake.clear()
        finally:
            self.leadership.release()

    @contextmanager
    def _pool_guard(self, fid: str, name: str, app_id: str | None, failed: set[str]) -> Iterator[None]:
        """Everything done for one pool in a tick runs under this: if it raises, that pool is skipped for this
        tick (and reported once per distinct error); every other pool proceeds."""
        try:
            yield
        except Exception as e:
            failed.add(fid)
            why = describe_error(e)
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
            log.info("reconciler: pool of function %s (%s) works again", fn.name, fid)
            self._report("pool.recovered", f"function {fn.name}: its pool works again", fn.app_id, fid)
        for fid in [f for f in self._spec_checks if f not in fns]:
            del self._spec_checks[fid]

    def _check_stored_spec(self, fid: str, fn: Any) -> None:
        """Rows stored before the server validated specs (or written around it) may not hold what the
        autoscaler needs: checked once per version, so that such a pool stops with an error naming the field
        rather than failing somewhere deeper on every tick. Keys this version does not know are ignored."""
        checked = self._spec_checks.get(fid)
        if checked is None or checked[0] != fn.version:
            try:
                validate_wire_spec(fn.spec, ignore_unknown_keys=True)
                checked = (fn.version, None)
            except InvalidError as e:
                checked = (fn.version, str(e))
            self._spec_checks[fid] = checked
        if checked[1] is not None:
            raise InvalidError(f"its stored spec is invalid: {checked[1]}")

    # -- the loop ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        cp = self.cp
        if now - self._last_housekeeping > 1.0:
            self._last_housekeeping = now
            self._step("requeueing expired leases", self._requeue_expired, now)
            self._step("stopping abandoned apps", cp.apps.stop_abandoned_apps)
            self.pruner.maybe_start(now, self._step)  # about once a minute, on its own thread
            if now - self._last_inventory > INVENTORY_INTERVAL_S:
                self._step("listing provider machines", self._settle_inventory)
        ledger = cp.ledger
        if ledger is not None and ledger.due(time.time()):  # wall time: what the clouds bill by
            self._step("accruing the cost ledger", ledger.accrue)
        self._step("firing schedules", self.scheduler.run_due, now)  # before counting: its calls count now
        self._step("reaping workers", self._reap, now)
        counts = cp.queue.counts()
        # web requests waiting for a worker are backlog, those in flight load, as inputs are
        web = cp.web.demand() if cp.web is not None else {}
        self._web_last = {fid: d[2] for fid, d in web.items()}
        for fid, (waiting, serving, _last) in web.items():
            pending, running = counts.get(fid, (0, 0))
            counts[fid] = (pending + waiting, running + serving)
        with cp.db.read() as conn:
            fns = {
                r.id: r
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
                    ).where(F.c.state == FunctionState.ACTIVE)
                ).all()
            }
            workers = conn.execute(
                select(*TICK_WORKER_COLUMNS).where(W.c.state.in_(LIVE_WORKER_STATES))
            ).all()
        by_fn: dict[str, list[Any]] = {}
        for w in workers:
            by_fn.setdefault(w.function_id, []).append(w)
        # This machine's worker budget counts the workers that run here (cloud workers run on their nodes).
        self._live_total = sum(1 for w in workers if w.provider == "local") + sum(
            n for f, n in self._launching.items() if f not in self._cloud_pools
        )
        self._served = {
            w.function_id for w in workers if w.state in (WorkerState.STARTING, WorkerState.READY)
        }
        self._idle_elsewhere = sorted(
            (w.idle_since, w.id, w.function_id)
            for w in workers
            if w.state == WorkerState.READY and w.idle_since is not None
        )
        failed: set[str] = set()  # pools that raised in this tick
        # Workers of stopped functions, or of an older version after a redeploy, drain.
        for fid, ws in by_fn.items():
            fn = fns.get(fid)
            with self._pool_guard(fid, fn.name if fn else fid, fn.app_id if fn else ws[0].app_id, failed):
                for w in ws:
                    if w.state == WorkerState.DRAINING:
                        continue
                    if fn is None:
                        cp.workers.drain_worker(w.id, "app stopped")
                    elif w.function_version < fn.version:
                        cp.workers.drain_worker(w.id, f"replaced by version {fn.version}")
        for fid, fn in fns.items():
            with self._pool_guard(fid, fn.name, fn.app_id, failed):
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
        spec = self.cp.functions.spec_of(fid, fn.spec)
        ws = [w for w in workers if w.function_version >= fn.version]
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
                worker_id=f"launching-{i}",
                state=WorkerState.STARTING,
                started_at=now,
                idle_since=None,
                in_flight=0,
            )
            for i in range(launching)
        ]
        snap = PoolSnapshot(
            backlog=pending,
            in_flight=running,
            workers=views,
            last_active_at=max(fn.last_active_at or 0.0, self._web_last.get(fid, 0.0)) or fn.last_active_at,
            settings=spec.autoscaler,
            per_worker_target=target,
            service_time_s=self._service_time(fid),
            startup_s=self._startup_time(fid, ws),
        )
        decision = self.autoscaler.decide(snap, now)
        for wid in decision.terminate:
            if not wid.startswith("launching-"):
                self.cp.workers.drain_worker(wid, "scaled down: idle past scaledown_window")
                self.cp.activity.event(
                    "pool.scale_down",
                    f"draining idle worker {wid}",
                    app_id=fn.app_id,
                    function_id=fid,
                    worker_id=wid,
                )
        launch = decision.launch
        on_this_machine = self._runs_here(fn, spec)
        if on_this_machine:
            self._cloud_pools.discard(fid)
        else:
            self._cloud_pools.add(fid)
        # room on this machine for more workers; None: the pool's workers run elsewhere (no budget here)
        room = self.max_workers - self._live_total if on_this_machine else None
        if room is not None and launch > room:
            # Make room by stopping workers that sit idle in other pools (longest idle first).
            for _since, wid, other in list(self._idle_elsewhere):
                if room >= launch:
                    break
                if other == fid:
                    continue
                self._idle_elsewhere.remove((_since, wid, other))
                self.cp.workers.drain_worker(
                    wid,
                    f"idle; this machine's {self.max_workers}-worker budget is needed by another function",
                )
            launch = max(0, room)
        if launch > 0 and now >= self._next_launch_at.get(fid, 0.0):
            launch = self.budgets.allow(
                fn.app_id,
                fid,
                launch,
                lambda: self._next_price(fid, fn, spec, now),
                self._launching.get(fid, 0),
            )
        if launch > 0 and now >= self._next_launch_at.get(fid, 0.0):
            if on_this_machine:
                self._live_total += launch
            floor = (
                on_demand_launches(
                    self.market_policy,
                    spec.min_on_demand,
                    [_pool_worker(w) for w in ws],
                    self._od_launching.get(fid, 0),
                )
                if spec.gpu and self.clouds
                else 0
            )
            self.cp.activity.event(
                "pool.scale_up",
                f"launching {launch} worker(s): {decision.reason}",
                app_id=fn.app_id,
                function_id=fid,
                desired=decision.desired,
            )
            for i in range(launch):
                self._launch(fid, fn, spec, force_on_demand=i < floor)
        elif (
            spec.gpu
            and self.clouds
            and spec.spot == "allow"
            and not self._launching.get(fid)
            and (room is None or room > 0)
        ):
            self._move_back_to_spot(fid, fn, spec, ws, now)
        # after the launches: the row is not on a cold start's path
        self._record_pool(fid, fn.app_id, decision, len(ws), now)

    def _next_price(self, fid: str, fn: Any, spec: FunctionSpec, now: float) -> float:
        """The $/h of the worker the pool would start next: its best-ranked candidate's (budgets)."""
        cpu_fallback = self.cp.secrets.open_env(fn.inline_env).get("CLOUDMODAL_CPU_FALLBACK") == "1"
        choices = self._choices(spec, fid, cpu_fallback, now, False)
        return choices[0].price if choices else 0.0

    def _on_demand_floor(self, fid: str, spec: FunctionSpec, ws: list[Any]) -> frozenset[str]:
        """The pool's ``min_on_demand`` floor: its cheapest (then oldest) live on-demand cloud workers. The
        autoscaler stops them last, and the control plane hands them inputs first: they are paid for whether
        they work or not, so work they take lets a spot worker go idle and stop."""
        floor: frozenset[str] = frozenset()
        if spec.min_on_demand and spec.gpu and self.clouds:
            floor = on_demand_floor(spec.min_on_demand, [_pool_worker(w) for w in ws])
        if self._floors.get(fid, frozenset()) != floor:  # tell the control plane what changed, only
            self.cp.set_floor(fid, floor)
            self._floors[fid] = floor
        return floor

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

    def _move_back_to_spot(self, fid: str, fn: Any, spec: FunctionSpec, ws: list[Any], now: float) -> None:
        """A pool fallen back to on-demand probes spot now and then with one extra worker; once spot works
        again its on-demand workers above ``min_on_demand`` are replaced by spot ones, one at a time
        (:func:`~cloudmodal.server.scaling_rules.move_back_to_spot`)."""
        spot: list[_Choice] = []

        def spot_price() -> float | None:
            best = next((c for c in self.cloud_choices(spec, fid, now) if c.market == SPOT), None)
            if best is None:
                return None
            spot.append(best)
            return best.price

        # Workers whose replacement is on its way are gone, for the move (and not replaced twice).
        leaving = set(self._replacing.get(fid, {}).values())
        move = move_back_to_spot(
            self.market_policy,
            self._market(fid),
            [_pool_worker(w) for w in ws],
            spec.min_on_demand,
            spot_price,
            now,
            leaving=leaving,
        )
        if move.probe:
            self.cp.activity.event(
                "pool.spot_probe",
                "trying spot again with one extra worker",
                app_id=fn.app_id,
                function_id=fid,
            )
            self._launch(fid, fn, spec, spot_only=True)
        for wid in move.replace:
            new = self._launch(fid, fn, spec, spot_only=True)
            self._replacing.setdefault(fid, {})[new] = wid
            self.cp.activity.event(
                "pool.rebalance",
                f"replacing on-demand worker {wid} by spot ({spot[0].describe()}): launching {new}; {wid} "
                "keeps serving until it is ready",
                app_id=fn.app_id,
                function_id=fid,
                worker_id=wid,
                replacement=new,
            )

    def _settle_replacements(self, fid: str, fn: Any, ws: list[Any]) -> None:
        """Drain each on-demand worker whose spot replacement is ready (not before: the pool would be short
        while the replacement boots); forget replacements that failed or stopped first (the worker stays).
        See :func:`~cloudmodal.server.scaling_rules.settle_replacements`."""
        pending = self._replacing.get(fid)
        if not pending:
            return
        drain, done = settle_replacements(
            pending, {w.id: _pool_worker(w) for w in ws}, self.cp.workers.worker_state
        )
        for new in done:
            del pending[new]
        for new, old in drain:
            self.cp.workers.drain_worker(old, "replaced by a cheaper spot worker")
            self.cp.activity.event(
                "pool.rebalanced",
                f"spot worker {new} is ready: draining on-demand worker {old}",
                app_id=fn.app_id,
                function_id=fid,
                worker_id=old,
                replacement=new,
            )
        if not pending:
            self._replacing.pop(fid, None)
