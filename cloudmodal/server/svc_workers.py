"""Workers from launch to end: added by the reconciler, registered and ready, heartbeating (with what they
hold, what they served, and the cancellations waiting for them), drained, stopped (what they held requeued).
Also the service-time estimate their heartbeats feed, and the rule that fails a function's waiting inputs
when its workers cannot even start."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select, update

from cloudmodal.exception import NotFoundError
from cloudmodal.server import models
from cloudmodal.server.states import WorkerState

if TYPE_CHECKING:
    from cloudmodal.server.hotsql import HotStatements
    from cloudmodal.server.service import ControlPlane

W = models.workers

LIVE_WORKER_STATES = (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING)


class Workers:
    SERVICE_HALF_LIFE = 200  # inputs: the estimate follows a function whose inputs change in length
    STARTUP_FAILURE_BUDGET = 3

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._lock = cp._lock  # the control plane's one lock guards the cancellations and the estimates too
        self._workers: dict[
            str, tuple[str, str]
        ] = {}  # worker id -> (function id, state), this process's view
        self._cancel_requests: dict[str, set[int]] = {}  # worker id -> input ids to interrupt
        self._startup_failures: dict[str, int] = {}  # function id -> consecutive workers that failed to start
        self._service: dict[str, float] = {}  # function id -> mean seconds per input (workers' reports)

    # -- from launch to ready ----------------------------------------------------------------------------
    def add_worker(self, worker_id: str, app_id: str, function_id: str, **values: Any) -> None:
        with self.cp.db.write() as conn:
            conn.execute(
                W.insert().values(
                    id=worker_id,
                    app_id=app_id,
                    function_id=function_id,
                    state=WorkerState.STARTING,
                    started_at=time.time(),
                    last_heartbeat=time.time(),
                    **values,
                )
            )
        self._set_state(worker_id, function_id, WorkerState.STARTING)

    def register_worker(self, worker_id: str, pid: int | None, host: str) -> dict[str, Any]:
        """A worker's process is up: record where it runs, and tell it what to serve and how often to report."""
        with self.cp.db.write() as conn:
            row = conn.execute(select(W.c.function_id, W.c.state).where(W.c.id == worker_id)).first()
            if row is None:
                raise NotFoundError(f"Worker {worker_id} is not known to this control plane.")
            conn.execute(
                update(W).where(W.c.id == worker_id).values(pid=pid, host=host, last_heartbeat=time.time())
            )
        out = self.cp.functions.worker_definition(row[0])
        out["lease_s"] = self.cp.settings.lease_s
        out["heartbeat_s"] = self.cp.settings.heartbeat_s
        return out

    def worker_ready(self, worker_id: str) -> None:
        fid = self.worker_row(worker_id)["function_id"]
        self._startup_failures.pop(fid, None)
        with self.cp.db.write() as conn:
            conn.execute(
                update(W)
                .where(and_(W.c.id == worker_id, W.c.state == WorkerState.STARTING))
                .values(state=WorkerState.READY, ready_at=time.time(), idle_since=time.time())
            )
        row = self.worker_row(worker_id)
        self._set_state(worker_id, fid, row["state"])
        self.cp.set_price(worker_id, row["price_per_hour"] or 0.0)
        if row["ready_at"] is not None:
            self.cp.activity.event(
                "worker.ready",
                f"worker {worker_id} ready after {row['ready_at'] - row['started_at']:.2f} s",
                app_id=row["app_id"],
                function_id=row["function_id"],
                worker_id=worker_id,
            )

    # -- reads -------------------------------------------------------------------------------------------
    def worker_row(self, worker_id: str) -> dict[str, Any]:
        with self.cp.db.read() as conn:
            row = conn.execute(select(W).where(W.c.id == worker_id)).first()
        if row is None:
            raise NotFoundError(f"Worker {worker_id} not found.")
        return dict(row._mapping)

    def cached_function(self, worker_id: str) -> tuple[str, str] | None:
        """(function id, state) of a worker from this process's view; None where it has none yet."""
        return self._workers.get(worker_id)

    def worker_function(self, worker_id: str) -> tuple[str, str]:
        """(function id, state) of a worker, from this process's view when it has one."""
        got = self._workers.get(worker_id)
        if got is None:
            row = self.worker_row(worker_id)
            got = (row["function_id"], row["state"])
            self._workers[worker_id] = got
            self.cp.set_price(worker_id, row["price_per_hour"] or 0.0)
        return got

    def worker_state(self, worker_id: str) -> str | None:
        with self.cp.db.read() as conn:
            return conn.execute(select(W.c.state).where(W.c.id == worker_id)).scalar_one_or_none()

    def _set_state(self, worker_id: str, function_id: str, state: str) -> None:
        if state == WorkerState.STOPPED:
            self._workers.pop(worker_id, None)
            self.cp.forget_price(worker_id)
        else:
            self._workers[worker_id] = (function_id, state)

    # -- while it runs -----------------------------------------------------------------------------------
    def beat_in(
        self, hot: HotStatements, beats: Sequence[tuple[str, int, bool, Sequence[int]]], now: float
    ) -> list[tuple[str, str] | None]:
        """Heartbeats ``(worker id, in flight, idle, input ids held)`` in ``hot``'s transaction: each worker's
        (state, function id), None for a worker not found. The leases of the inputs each found worker says
        it holds are renewed; inputs claimed for it that it does not hold (the claim's reply was lost, e.g. in
        a control-plane restart) are left to expire and requeue."""
        rows = hot.beat_workers(
            [(b[0], b[1], b[2]) for b in beats],
            now,
            [(iid, b[0]) for b in beats for iid in b[3]],
            now + self.cp.settings.lease_s,
        )
        found = {r[0]: (r[1], r[2]) for r in rows}
        return [found.get(b[0]) for b in beats]

    def beat_answer(
        self, worker_id: str, row: tuple[str, str] | None, served: int, busy_s: float
    ) -> dict[str, Any]:
        """A recorded heartbeat's answer: drain (the worker is draining, stopped or unknown) and the inputs
        to interrupt; what it served feeds the function's service-time estimate."""
        if row is None:
            return {"drain": True, "cancel": []}
        if served > 0:
            self.record_service(row[1], served, busy_s)
        with self._lock:
            cancel = sorted(self._cancel_requests.pop(worker_id, set()))
        return {"drain": row[0] in (WorkerState.DRAINING, WorkerState.STOPPED), "cancel": cancel}

    def request_cancel(self, held: list[tuple[int, str | None]]) -> None:
        """Ask the workers holding ``(input id, worker id)`` to interrupt those inputs (on their next heartbeat)."""
        with self._lock:
            for iid, wid in held:
                if wid:
                    self._cancel_requests.setdefault(wid, set()).add(iid)

    def record_service(self, function_id: str, served: int, busy_s: float) -> None:
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

    def release_inputs(self, worker_id: str, input_ids: list[int] | None) -> int:
        """Requeue inputs a worker gives back (all it holds with ``None``); returns how many."""
        n, _ = self.cp.queue.release_worker(worker_id, crashed=False, input_ids=input_ids)
        with self.cp.db.read() as conn:
            fid = conn.execute(select(W.c.function_id).where(W.c.id == worker_id)).scalar_one_or_none()
        if fid:
            self.cp.inputs_pending(fid)
        return n

    # -- to the end --------------------------------------------------------------------------------------
    def drain_worker(self, worker_id: str, reason: str) -> None:
        """The worker finishes what it holds and takes nothing new."""
        with self.cp.db.write() as conn:
            conn.execute(
                update(W)
                .where(and_(W.c.id == worker_id, W.c.state.in_((WorkerState.STARTING, WorkerState.READY))))
                .values(state=WorkerState.DRAINING, stop_reason=reason)
            )
        got = self._workers.get(worker_id)
        if got is not None and got[1] != WorkerState.STOPPED:
            self._set_state(worker_id, got[0], WorkerState.DRAINING)
        self.cp.unpark_worker(worker_id)  # a draining worker gets no new inputs
        if self.cp.web is not None:  # ... nor new web requests
            self.cp.web.draining(worker_id)
        self.cp.hub.notify(f"drain:{worker_id}")

    def worker_stopped(self, worker_id: str, reason: str, *, crashed: bool) -> None:
        """Mark a worker gone and requeue whatever it still held (a crash counts against the input)."""
        cp = self.cp
        with cp.db.write() as conn:
            row = conn.execute(
                select(W.c.state, W.c.app_id, W.c.function_id, W.c.stop_reason).where(W.c.id == worker_id)
            ).first()
            if row is None or row[0] == WorkerState.STOPPED:
                return
            stopped_at = time.time()
            conn.execute(
                update(W)
                .where(W.c.id == worker_id)
                .values(state=WorkerState.STOPPED, stopped_at=stopped_at, stop_reason=row[3] or reason)
            )
        cp.unpark_worker(worker_id)  # before requeueing what it held: nothing new reaches it after
        n, dead_calls = cp.queue.release_worker(worker_id, crashed=crashed)
        cp.tokens.revoke_scope(f"worker:{worker_id}")
        self._set_state(worker_id, row[2], WorkerState.STOPPED)
        # its claim waiting here answers now (drain) instead of at the end of its wait
        cp.hub.notify(*[f"outputs:{c}" for c in dead_calls], "reconcile", f"drain:{worker_id}")
        cp.inputs_pending(row[2])
        msg = f"worker {worker_id} stopped: {reason}" + (f"; {n} inputs requeued" if n else "")
        cp.activity.event(
            "worker.crashed" if crashed else "worker.stopped",
            msg,
            app_id=row[1],
            function_id=row[2],
            worker_id=worker_id,
            requeued=n,
            stopped_at=stopped_at,
        )
        if self.cp.ledger is not None:
            self.cp.ledger.soon()  # its last span, with the billing minimum, is written on the next accrual
        if reason.startswith("startup failed"):
            self._on_startup_failure(row[1], row[2], reason)

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
        calls = self.cp.queue.fail_pending(function_id, failure_payload(err, tb=""))
        self._startup_failures[function_id] = 0
        self.cp.activity.event("function.failed", str(err), app_id=app_id, function_id=function_id)
        self.cp.hub.notify(*[f"outputs:{c}" for c in calls])
        if self.cp.web is not None:  # web requests waiting for a worker get the error too
            self.cp.web.fail_waiting(function_id, str(err))
