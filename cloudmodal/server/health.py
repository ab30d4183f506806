"""The reconciler's watch over workers: reaping exited ones, replacing silent ones, preemption notices.

- A worker whose process exited without saying goodbye crashed: its inputs are requeued at once, counted
  against their crash budget (never against the user's Retries). One that exits while draining, with code 0,
  stopped cleanly; one its cloud reclaimed was preempted.
- A worker silent for ``worker_timeout_s`` (hung, partitioned, or launched by a previous control plane and
  gone) is killed and written off; one that does not finish draining in time too.
- A spot worker with a preemption notice stops claiming, its inputs go back to the queue at once, and the
  spot policy counts the preemption (which may block its offer, or fall the pool back to on-demand).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import and_, func, select

from cloudmodal.pricing.offers import SPOT
from cloudmodal.providers.base import SupportsInventory, SupportsPreemptionNotice, WorkerHandle
from cloudmodal.providers.nodes import NodeRef, same_node, worker_key
from cloudmodal.server import models
from cloudmodal.server.reconciler_base import ReconcilerBase
from cloudmodal.server.service import LIVE_WORKER_STATES
from cloudmodal.server.states import WorkerState

log = logging.getLogger("cloudmodal.reconciler")

W = models.workers
STARTUP_GRACE_S = (
    120.0  # a launched worker that never registers is replaced after this (plus startup_timeout)
)
DRAIN_GRACE_S = 30.0


class Health(ReconcilerBase):
    """Reaping, silent workers and preemption notices (a part of the reconciler)."""

    def _adopt_orphans(self, before: float | None = None) -> None:
        """On start and on take-over: settle what a previous control plane left.

        Workers that registered keep running and heartbeating: their handles are read back from their rows,
        so that this control plane watches and stops their machines (and re-opens a node's tunnel). Workers
        that never registered are written off (their tokens were only in the previous process's memory).
        Then every provider that can list its machines is asked for this control plane's: a machine with no
        live worker row is terminated (see :meth:`_settle_inventory`). ``before``: when this control plane took
        over; workers added since are its own (launches it started, or workers added through its API)."""
        for prov in self.providers.values():
            bind = getattr(prov, "bind", None)
            if bind is not None:
                bind(self.cp.control_plane_id, self.server_url)
        with self.cp.db.read() as conn:
            unregistered = and_(W.c.state == WorkerState.STARTING, W.c.pid.is_(None))
            if before is not None:
                unregistered = and_(unregistered, W.c.started_at < before)
            rows = conn.execute(select(W.c.id).where(unregistered)).all()
        for (wid,) in rows:
            if wid in self.handles:  # launched by this process (a leader that lost and regained the lock)
                continue
            self._step(
                f"worker {wid} (write-off)",
                self.cp.workers.worker_stopped,
                wid,
                "control plane restarted before the worker registered",
                crashed=False,
            )
        with self.cp.db.read() as conn:
            live = conn.execute(
                select(W.c.id, W.c.provider, W.c.handle).where(
                    and_(W.c.state.in_(LIVE_WORKER_STATES), W.c.handle.is_not(None))
                )
            ).all()
        for wid, provider, wire in live:
            if wid not in self.handles and provider in self.providers:
                self._step(f"worker {wid} (adopt)", self._adopt, wid, self.providers[provider], wire)
        self._step("listing provider machines", self._settle_inventory)

    def _adopt(self, wid: str, prov: Any, wire: dict[str, Any]) -> None:
        handle = WorkerHandle.from_wire(wire)
        adopt = getattr(prov, "adopt", None)
        if adopt is not None:
            adopt(handle)
        elif not handle.gpu_indices and prov.describe(handle).state == "unknown":
            # The provider cannot see this worker's machine: the local provider, for a process another control
            # plane started (a replica that died, or this one before a restart). Such a worker outlives its
            # control plane and reconnects to the address it was given (the replicas' one, Settings.public_url):
            # it is left to its heartbeats, not written off as exited while it still serves. Silent for
            # worker_timeout_s, it is written off then (see _check_silent); drained, it stops itself. (A local
            # worker holding GPUs is watched as before, and so written off: this process's provider would
            # otherwise give its GPUs to another worker.)
            log.info("worker %s (%s) adopted: watched through its heartbeats", wid, prov.name)
            row = self.cp.workers.worker_row(wid)
            self.cp.activity.event(
                "worker.adopted",
                f"worker {wid} ({prov.name}, {handle.instance_id}) adopted from a previous control plane: "
                "watched through its heartbeats",
                app_id=row["app_id"],
                function_id=row["function_id"],
                worker_id=wid,
            )
            return
        with self._lock:
            self.handles.setdefault(wid, (prov, handle))

    def _settle_inventory(self) -> None:
        """Every machine a provider runs for this control plane either belongs to a live worker row (adopted,
        if this process does not watch it yet) or is terminated: a paid machine never outlives the control
        plane's knowledge of it (a crash between asking the cloud for a node and recording it leaves one)."""
        self._last_inventory = self.clock()
        cp_id = self.cp.control_plane_id
        for prov in self.providers.values():
            if not isinstance(prov, SupportsInventory):
                continue
            machines = prov.inventory(cp_id)
            if not machines:
                continue
            with self.cp.db.read() as conn:
                rows = conn.execute(
                    select(W.c.id, W.c.handle).where(
                        and_(W.c.provider.in_((prov.name, "-")), W.c.state.in_(LIVE_WORKER_STATES))
                    )
                ).all()
            live = {worker_key(wid): (wid, wire) for wid, wire in rows}
            adopted: set[str] = set()
            with self._lock:
                watched = {worker_key(wid): h.extra.get("node") for wid, (_p, h) in self.handles.items()}
            for m in machines:
                key = worker_key(m.worker_id)
                # A worker's node is the one its handle names; another machine tagged with the same worker is a
                # surplus sibling of a hedged launch round that was not terminated (a crash mid-round).
                if key in watched:
                    if _other_node(m, watched[key]):
                        self._step(f"machine {m.instance_id} (orphan)", self._terminate_orphan, prov, m, True)
                    continue
                if key in live:
                    wid, wire = live[key]
                    if wire is None:
                        continue  # a launch in flight: its handle is recorded when it returns
                    if _other_node(m, (wire.get("extra") or {}).get("node")):
                        self._step(f"machine {m.instance_id} (orphan)", self._terminate_orphan, prov, m, True)
                    elif key not in adopted:
                        adopted.add(key)
                        self._step(f"worker {wid} (adopt)", self._adopt, wid, prov, wire)
                    continue
                self._step(f"machine {m.instance_id} (orphan)", self._terminate_orphan, prov, m)

    def _terminate_orphan(self, prov: Any, m: WorkerHandle, sibling: bool = False) -> None:
        """``sibling``: the machine's worker is live on another node, whose state in the provider stays."""
        if sibling and hasattr(prov, "discard"):
            prov.discard(m)
        else:
            prov.terminate(m, grace_s=0.0)
        why = (
            "tagged with a live worker that runs on another node (a surplus of a hedged launch round that a "
            "crash left behind)"
            if sibling
            else "running with no live worker of this control plane on it (a launch interrupted by a restart, "
            "or a worker written off)"
        )
        log.warning("terminated %s machine %s: %s", prov.name, m.instance_id, why)
        self.cp.activity.event(
            "machine.orphan_terminated",
            f"{prov.name} machine {m.instance_id} (worker {m.worker_id}) was {why}: terminated",
            app_id=m.extra.get("app_id"),
            function_id=m.extra.get("function_id"),
            worker_id=m.worker_id,
            provider=prov.name,
            instance_id=m.instance_id,
        )

    def _reap(self, now: float) -> None:
        self._release_machines()
        for wid, (prov, handle) in list(self.handles.items()):
            self._step(f"worker {wid} (reap)", self._reap_one, wid, prov, handle, now)
        # Workers that went silent (hung, partitioned, or launched by a previous control plane and gone): only
        # those whose last heartbeat is older than the timeout are candidates (a draining worker's limit is
        # later still), so a tick costs nothing per worker that is heartbeating.
        cutoff = now - self.cp.settings.worker_timeout_s
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(W.c.id, W.c.state, W.c.last_heartbeat, W.c.started_at).where(
                    and_(W.c.state.in_(LIVE_WORKER_STATES), W.c.last_heartbeat < cutoff)
                )
            ).all()
        for wid, state, last_hb, started_at in rows:
            self._step(
                f"worker {wid} (heartbeat)", self._check_silent, wid, state, last_hb, started_at, now, cutoff
            )
        if self._step_errors:  # forget the failures of workers that are gone
            with self.cp.db.read() as conn:
                live = conn.execute(select(W.c.id).where(W.c.state.in_(LIVE_WORKER_STATES))).scalars()
                known = set(self.handles) | set(live)
            for key in [
                k for k in self._step_errors if k.startswith("worker ") and k.split()[1] not in known
            ]:
                del self._step_errors[key]

    def _release_machines(self) -> None:
        """A cloud node outlives its worker's process: once the worker has stopped (drained on scale-down,
        exited, written off), its node is terminated here. One query for every watched cloud worker."""
        with self._lock:
            machines = {wid: e for wid, e in self.handles.items() if isinstance(e[0], SupportsInventory)}
        if not machines:
            return
        with self.cp.db.read() as conn:
            live = set(
                conn.execute(
                    select(W.c.id).where(and_(W.c.id.in_(list(machines)), W.c.state.in_(LIVE_WORKER_STATES)))
                ).scalars()
            )
        for wid, (prov, handle) in machines.items():
            if wid not in live:
                self._step(f"worker {wid} (release)", self._release, wid, prov, handle)

    def _release(self, wid: str, prov: Any, handle: Any) -> None:
        prov.terminate(handle, grace_s=0.0)
        with self._lock:
            self.handles.pop(wid, None)
        log.info("worker %s stopped: its %s machine %s terminated", wid, prov.name, handle.instance_id)

    def _reap_one(self, wid: str, prov: Any, handle: Any, now: float) -> None:
        extra = dict(handle.extra) if isinstance(prov, SupportsInventory) else None
        status = prov.describe(handle)
        if extra is not None and handle.extra != extra:  # what a restarted control plane needs to find it
            with self.cp.db.write() as conn:
                conn.execute(W.update().where(W.c.id == wid).values(handle=handle.to_wire()))
        if status.alive:
            if isinstance(prov, SupportsPreemptionNotice) and wid not in self._noticed:
                at = prov.preemption_notice(handle)
                if at is not None:
                    self._noticed.add(wid)
                    self._on_preemption_notice(wid, handle, at, now)
            return
        with self._lock:
            self.handles.pop(wid, None)
        state = self.cp.workers.worker_state(wid)
        if state in (None, WorkerState.STOPPED):
            return
        if status.state == "preempted" or wid in self._noticed:
            self._noticed.discard(wid)
            self.cp.workers.worker_stopped(
                wid, f"preempted ({status.detail or 'spot capacity reclaimed'})", crashed=False
            )
            return
        clean = state == WorkerState.DRAINING and status.returncode == 0
        reason = f"process exited with code {status.returncode}" + (
            f" ({status.detail})" if status.detail else ""
        )
        if state == WorkerState.STARTING and not clean:
            # It exited before registering, so it could not say why itself (a wrong TLS pin, an unreachable
            # control plane): counted as a start-up failure, so that a function whose workers cannot start
            # fails its waiting inputs after a few instead of launching (and paying for) nodes forever.
            reason = f"startup failed: {reason}"
        self.cp.workers.worker_stopped(wid, reason, crashed=not clean)

    def _check_silent(
        self, wid: str, state: str, last_hb: float, started_at: float, now: float, cutoff: float
    ) -> None:
        starting = state == WorkerState.STARTING
        if wid in self.handles and starting and now - started_at < STARTUP_GRACE_S:
            return
        if (
            state == WorkerState.DRAINING
            and last_hb < now - DRAIN_GRACE_S - self.cp.settings.worker_timeout_s
        ):
            self._kill(wid)
            self.cp.workers.worker_stopped(wid, "did not finish draining in time", crashed=False)
        elif last_hb < cutoff and (not starting or now - started_at > STARTUP_GRACE_S):
            self._kill(wid)
            self.cp.workers.worker_stopped(wid, f"no heartbeat for {now - last_hb:.0f} s", crashed=True)

    def on_worker_notice(self, wid: str, at: float, source: str) -> int:
        """A worker says its node will be reclaimed at ``at`` (it read its cloud's notice): as a notice the
        provider reported. Once per worker; returns the inputs requeued."""
        with self._lock:
            if wid in self._noticed:
                return 0
            self._noticed.add(wid)
            entry = self.handles.get(wid)
        row = self.cp.workers.worker_row(wid)
        handle = entry[1] if entry is not None else None
        if handle is None and row.get("handle"):
            handle = WorkerHandle.from_wire(row["handle"])
        log.info("worker %s: preemption notice from %s, reclaimed at %.0f", wid, source or "its node", at)
        return self._on_preemption_notice(wid, handle, at, self.clock())

    def _on_preemption_notice(self, wid: str, handle: Any, at: float, now: float) -> int:
        """A spot worker will be reclaimed: it stops claiming, its inputs go back to the queue at once (not
        after a lease), and the autoscaler, no longer counting it, starts a replacement right away."""
        row = self.cp.workers.worker_row(wid)
        fid = row["function_id"]
        self.cp.workers.drain_worker(wid, f"preemption notice: reclaimed in {max(0.0, at - now):.0f} s")
        n = self.cp.workers.release_inputs(wid, None)
        self.cp.activity.event(
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
                    and_(
                        W.c.function_id == fid,
                        W.c.market == SPOT,
                        W.c.state.in_((WorkerState.STARTING, WorkerState.READY)),
                    )
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
            self.cp.activity.event(
                "offer.blocked",
                f"{offer.cloud} {offer.zone or offer.region} {offer.instance_type} spot blocked for {until - now:.0f} s: its workers keep being preempted",
                app_id=row["app_id"],
                function_id=fid,
            )
        if msg:
            self.cp.activity.event("pool.spot_fallback", msg, app_id=row["app_id"], function_id=fid)
        self.wake()
        return n

    def _kill(self, wid: str) -> None:
        entry = self.handles.pop(wid, None)
        if entry is not None:
            try:
                entry[0].terminate(entry[1], grace_s=2.0)
            except Exception:
                log.exception("terminate failed")


def _other_node(m: WorkerHandle, node: Any) -> bool:
    """Whether machine ``m`` (from an inventory) is not the node ``node`` names (a handle's ``extra["node"]``);
    False where either names none (providers without node refs)."""
    mine = m.extra.get("node")
    if not isinstance(node, dict) or not isinstance(mine, dict):
        return False
    return not same_node(NodeRef.from_wire(mine), NodeRef.from_wire(node))
