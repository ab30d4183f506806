"""Function calls: created (idempotent by id) with their first inputs in the same transaction, read, and
cancelled (pending inputs end at once; running ones are interrupted through their workers' heartbeats)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloudmodal.exception import InvalidError, NotFoundError
from cloudmodal.server import models
from cloudmodal.server.states import FunctionState

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

CA = models.calls

TOUCH_EVERY_S = 1.0  # the autoscaler's "last active" of a function needs seconds, not every call


class Calls:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._active_written: dict[str, float] = {}  # function id -> last_active_at last written

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
        cp = self.cp
        now = time.time()
        leftover = False
        with cp.handing_off() as assigned, cp.db.hot() as hot:
            row = hot.function_state(function_id)
            if row is None:
                raise NotFoundError(f"Function {function_id} not found.")
            if row[1] != FunctionState.ACTIVE:
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
                cp.access.check_same_caller(
                    hot.call_owner(call_id), call_id, function_id, None if owner else created_by
                )
            else:
                cp.access.remember_call(call_id, function_id, created_by)
            if now - self._active_written.get(function_id, 0.0) >= TOUCH_EVERY_S:
                hot.touch_function(function_id, now)
                self._active_written[function_id] = now
            if inputs:
                leftover = cp.enqueue(hot, call_id, function_id, inputs, assigned)
        if inputs:
            cp.inputs_arrived(function_id, wake_claimers=leftover)
        return existed

    def call_row(self, call_id: str) -> dict[str, Any]:
        with self.cp.db.read() as conn:
            row = conn.execute(select(CA).where(CA.c.id == call_id)).first()
        if row is None:
            raise NotFoundError(f"Function call {call_id!r} not found.")
        return dict(row._mapping)

    def cancel_call(self, call_id: str) -> None:
        running = self.cp.queue.cancel_call(call_id)
        if running:
            I = models.inputs  # noqa: E741
            with self.cp.db.read() as conn:
                rows = conn.execute(select(I.c.id, I.c.worker_id).where(I.c.id.in_(running))).all()
            self.cp.workers.request_cancel([(iid, wid) for iid, wid in rows])
        self.cp.hub.notify(f"outputs:{call_id}")
