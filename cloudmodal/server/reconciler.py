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
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import and_, select

from cloudmodal.exception import Error, NoProviderError
from cloudmodal.gpu import GpuTier
from cloudmodal.ids import new_id
from cloudmodal.server.autoscaler import Autoscaler, PoolSnapshot, WorkerView
from cloudmodal.server.models import Function, Worker
from cloudmodal.server.service import LIVE_WORKER_STATES, ControlPlane
from cloudmodal.spec import FunctionSpec

log = logging.getLogger("cloudmodal.reconciler")
F = Function.__table__
W = Worker.__table__

STARTUP_GRACE_S = 120.0  # a launched worker that never registers is replaced after this (plus startup_timeout)
DRAIN_GRACE_S = 30.0
LAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Reconciler:
    def __init__(self, cp: ControlPlane, provider: Any, server_url: str) -> None:
        self.cp = cp
        self.provider = provider
        self.server_url = server_url
        self.autoscaler = Autoscaler()
        self.handles: dict[str, Any] = {}
        self._launching: dict[str, int] = {}
        self._launch_failures: dict[str, int] = {}
        self._next_launch_at: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="launch")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self._lock = threading.Lock()
        # This machine's worker budget: workers beyond the cores only add start-up cost and contention.
        self.max_workers = int(os.environ.get("CLOUDMODAL_LOCAL_MAX_WORKERS") or max(4, 2 * (os.cpu_count() or 1)))
        self._live_total = 0
        self._served: set[str] = set()  # functions with live workers at the last tick
        self._idle_elsewhere: list[tuple[float, str, str]] = []  # (idle since, worker id, function id)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._adopt_orphans()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

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
            for wid, h in handles:
                while time.time() < deadline and self.provider.describe(h).alive:
                    time.sleep(0.05)
                self.provider.terminate(h, grace_s=1.0)
                self.cp.worker_stopped(wid, "control plane shut down", crashed=False)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(time.time())
            except Exception:  # the loop must survive anything; the next tick retries
                log.exception("reconciler tick failed")
            self._wake.wait(self.cp.settings.reconcile_interval_s)
            self._wake.clear()

    def _adopt_orphans(self) -> None:
        """After a restart, workers launched by a previous process keep running and heartbeating; they are
        adopted by heartbeat. Workers that never registered are written off."""
        now = time.time()
        with self.cp.db.read() as conn:
            rows = conn.execute(select(W.c.id).where(and_(W.c.state == "starting", W.c.pid.is_(None)))).all()
        for (wid,) in rows:
            self.cp.worker_stopped(wid, "control plane restarted before the worker registered", crashed=False)
        _ = now

    # -- resource checks at function registration ---------------------------------------------------------
    def check_resources(self, spec: FunctionSpec, *, allow_cpu_fallback: bool) -> None:
        if not spec.gpu or allow_cpu_fallback:
            return
        if self._local_tier(spec.gpu, need_free=False) is not None:
            return
        raise NoProviderError(_no_gpu_message(spec.gpu, self.provider))

    def _local_tier(self, tiers: tuple[GpuTier, ...], need_free: bool) -> GpuTier | None:
        can = getattr(self.provider, "can_satisfy", None)
        for t in tiers:
            if can is not None and can((t,)):
                return t
        return None

    # -- the loop ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        cp = self.cp
        if now - self._last_housekeeping > 1.0:
            self._last_housekeeping = now
            _, dead_calls = cp.queue.requeue_expired(now)
            if dead_calls:
                cp.hub.notify(*[f"outputs:{c}" for c in dead_calls])
            cp.stop_abandoned_apps()
        self._reap(now)
        counts = cp.queue.counts()
        with cp.db.read() as conn:
            fns = {r[0]: r for r in conn.execute(select(F.c.id, F.c.app_id, F.c.state, F.c.version, F.c.last_active_at, F.c.spec, F.c.inline_env).where(F.c.state == "active")).all()}
            workers = conn.execute(select(W).where(W.c.state.in_(LIVE_WORKER_STATES))).all()
        by_fn: dict[str, list[Any]] = {}
        for w in workers:
            by_fn.setdefault(w.function_id, []).append(w)
        self._live_total = len(workers) + sum(self._launching.values())
        self._served = {w.function_id for w in workers if w.state in ("starting", "ready")}
        self._idle_elsewhere = sorted((w.idle_since, w.id, w.function_id) for w in workers if w.state == "ready" and w.idle_since is not None)
        # Workers of stopped functions, or of an older version after a redeploy, drain.
        for fid, ws in by_fn.items():
            fn = fns.get(fid)
            for w in ws:
                if w.state == "draining":
                    continue
                if fn is None:
                    cp.drain_worker(w.id, "app stopped")
                elif w.function_version < fn[3]:
                    cp.drain_worker(w.id, f"replaced by version {fn[3]}")
        for fid, fn in fns.items():
            pending, running = counts.get(fid, (0, 0))
            spec = cp.spec_of(fid)
            ws = [w for w in by_fn.get(fid, []) if w.function_version >= fn[3]]
            if not (pending or running or ws or spec.autoscaler.min_containers or self._launching.get(fid)):
                continue
            self._scale(fid, fn, spec, pending, running, ws, now)

    def _scale(self, fid: str, fn: Any, spec: FunctionSpec, pending: int, running: int, ws: list[Any], now: float) -> None:
        target = 1
        if spec.concurrency is not None:
            target = spec.concurrency.target_inputs or spec.concurrency.max_inputs
        if spec.batching is not None:
            target = max(target, spec.batching.max_batch_size)
        views = [
            WorkerView(worker_id=w.id, state=w.state, started_at=w.started_at, idle_since=w.idle_since, in_flight=w.in_flight)
            for w in ws
        ]
        launching = self._launching.get(fid, 0)
        views += [WorkerView(worker_id=f"launching-{i}", state="starting", started_at=now, idle_since=None, in_flight=0) for i in range(launching)]
        snap = PoolSnapshot(
            backlog=pending,
            in_flight=running,
            workers=views,
            last_active_at=fn[4],
            settings=spec.autoscaler,
            per_worker_target=target,
        )
        decision = self.autoscaler.decide(snap, now)
        for wid in decision.terminate:
            if not wid.startswith("launching-"):
                self.cp.drain_worker(wid, "scaled down: idle past scaledown_window")
                self.cp.event("pool.scale_down", f"draining idle worker {wid}", app_id=fn[1], function_id=fid, worker_id=wid)
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
                self.cp.drain_worker(wid, f"idle; this machine's {self.max_workers}-worker budget is needed by another function")
            launch = max(0, room)
        if launch > 0 and now >= self._next_launch_at.get(fid, 0.0):
            self._live_total += launch
            self.cp.event("pool.scale_up", f"launching {launch} worker(s): {decision.reason}", app_id=fn[1], function_id=fid, desired=decision.desired)
            for _ in range(launch):
                self._launch(fid, fn, spec)

    def _launch(self, fid: str, fn: Any, spec: FunctionSpec) -> None:
        from cloudmodal.providers.base import LaunchRequest

        with self._lock:
            self._launching[fid] = self._launching.get(fid, 0) + 1
        app_id = fn[1]
        cpu_fallback = (fn[6] or {}).get("CLOUDMODAL_CPU_FALLBACK") == "1"
        tier = None if (cpu_fallback or not spec.gpu) else self._local_tier(spec.gpu, need_free=True)
        worker_id = new_id("ta")
        token = self.cp.tokens.create(scope=f"worker:{worker_id}", name=worker_id)
        image = spec.image or {}
        req = LaunchRequest(
            worker_id=worker_id,
            app_id=app_id,
            function_id=fid,
            gpu=tier,
            market="on-demand",
            cpu=spec.cpu,
            memory_mb=spec.memory,
            image_hash=spec.image_hash,
            pip_packages=tuple(image.get("pip_packages") or ()),
            env={
                "CLOUDMODAL_SERVER_URL": self.server_url,
                "CLOUDMODAL_TOKEN": token,
                "CLOUDMODAL_WORKER_ID": worker_id,
                "CLOUDMODAL_FUNCTION_ID": fid,
                "CLOUDMODAL_APP_ID": app_id,
                "PYTHONUNBUFFERED": "1",
            },
            argv=("-m", "cloudmodal.worker"),
        )
        self.cp.add_worker(worker_id, app_id, fid, provider=self.provider.name, function_version=fn[3], gpu=str(tier) if tier else None)

        def go() -> None:
            try:
                handle = self.provider.launch(req)
            except Error as e:
                n = self._launch_failures.get(fid, 0)
                self._launch_failures[fid] = n + 1
                delay = LAUNCH_BACKOFF_S[min(n, len(LAUNCH_BACKOFF_S) - 1)]
                self._next_launch_at[fid] = time.time() + delay
                self.cp.worker_stopped(worker_id, f"launch failed: {e}", crashed=False)
                self.cp.event("launch.failed", f"{type(e).__name__}: {e}; retrying in {delay:g} s", app_id=app_id, function_id=fid, worker_id=worker_id)
            except Exception as e:  # a provider bug must not kill the loop
                log.exception("launch crashed")
                self._next_launch_at[fid] = time.time() + 5.0
                self.cp.worker_stopped(worker_id, f"launch crashed: {e!r}", crashed=False)
            else:
                self._launch_failures.pop(fid, None)
                with self._lock:
                    self.handles[worker_id] = handle
                with self.cp.db.write() as conn:
                    conn.execute(
                        W.update().where(W.c.id == worker_id).values(instance_id=handle.instance_id, price_per_hour=handle.price_per_hour, market=handle.market)
                    )
                self.cp.event(
                    "worker.launched",
                    f"worker {worker_id} launched on {self.provider.name}" + (f" with {tier}" if tier else "") + (" (CPU fallback)" if cpu_fallback and spec.gpu else ""),
                    app_id=app_id,
                    function_id=fid,
                    worker_id=worker_id,
                )
            finally:
                with self._lock:
                    self._launching[fid] = max(0, self._launching.get(fid, 1) - 1)

        self._pool.submit(go)

    def _reap(self, now: float) -> None:
        for wid, handle in list(self.handles.items()):
            status = self.provider.describe(handle)
            if status.alive:
                continue
            with self._lock:
                self.handles.pop(wid, None)
            state = self.cp.worker_state(wid)
            if state in (None, "stopped"):
                continue
            clean = state == "draining" and status.returncode == 0
            self.cp.worker_stopped(
                wid,
                f"process exited with code {status.returncode}" + (f" ({status.detail})" if status.detail else ""),
                crashed=not clean,
            )
        # Workers that went silent (hung, partitioned, or launched by a previous control plane and gone).
        cutoff = now - self.cp.settings.worker_timeout_s
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(W.c.id, W.c.state, W.c.last_heartbeat, W.c.pid, W.c.started_at).where(W.c.state.in_(LIVE_WORKER_STATES))
            ).all()
        for wid, state, last_hb, pid, started_at in rows:
            if wid in self.handles and state == "starting" and now - started_at < STARTUP_GRACE_S:
                continue
            if state == "draining" and last_hb < now - DRAIN_GRACE_S - self.cp.settings.worker_timeout_s:
                self._kill(wid)
                self.cp.worker_stopped(wid, "did not finish draining in time", crashed=False)
            elif last_hb < cutoff and (state != "starting" or now - started_at > STARTUP_GRACE_S):
                self._kill(wid)
                self.cp.worker_stopped(wid, f"no heartbeat for {now - last_hb:.0f} s", crashed=True)

    def _kill(self, wid: str) -> None:
        h = self.handles.pop(wid, None)
        if h is not None:
            try:
                self.provider.terminate(h, grace_s=2.0)
            except Exception:
                log.exception("terminate failed")


def _no_gpu_message(tiers: tuple[GpuTier, ...], provider: Any) -> str:
    want = ", ".join(str(t) for t in tiers)
    have = ""
    inv = getattr(provider, "gpu_inventory", None)
    if inv is not None:
        try:
            devs = inv()
            have = ", ".join(sorted({d.name for d in devs})) if devs else "no GPUs"
        except Exception:
            have = "unknown"
    lines = [f"No enabled provider can run gpu={want!r}: this machine has {have or 'no GPUs'} and no cloud is enabled."]
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
        from cloudmodal.pricing.catalog import load_offer_table

        from cloudmodal.placement import PlacementPolicy, rank
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


_ = sys
