"""The durable input queue: batch put, batch claim with leases, idempotent outputs, requeue on expiry.

Delivery is at least once; exactly one *visible* result per input is guaranteed by the unique
``(input_id, gen_index)`` constraint on outputs: the first output written wins, later duplicates (a worker
whose lease expired but finished anyway) are ignored.

Retry accounting: a user exception or a timeout consumes one of the function's ``Retries``; a worker death
(crash, SIGKILL, preemption) does not — it is counted in ``crashes``, and only an input that keeps killing
its workers (``crash_budget`` times) ends as a ``WorkerCrashedError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update

from cloudmodal.server import models
from cloudmodal.server.db import Database
from cloudmodal.server.hotsql import HotStatements
from cloudmodal.server.states import InputState, OutputStatus
from cloudmodal.spec import RetryPolicy

I = models.inputs  # noqa: E741
O = models.outputs  # noqa: E741
C = models.calls

DEFAULT_CRASH_BUDGET = 3
RETRYABLE = (OutputStatus.FAILURE, OutputStatus.TIMEOUT)  # the ends a function's Retries may retry


# inline output bytes one read of a call's outputs returns at most (past its first row)
OUTPUTS_READ_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class FunctionPolicy:
    retries: RetryPolicy | None = None
    crash_budget: int = DEFAULT_CRASH_BUDGET


@dataclass
class ClaimedInput:
    input_id: int
    call_id: str
    idx: int
    method: str | None
    args: bytes | None
    args_blob: str | None
    attempt: int


@dataclass
class OutputItem:
    input_id: int
    status: str  # an OutputStatus: success | failure | timeout | gen_item | cancelled
    data: bytes | None = None
    data_blob: str | None = None
    gen_index: int = -1
    retryable: bool = True  # a failure the user's Retries may retry (False for e.g. bad arguments)


class InputQueue:
    def __init__(self, db: Database, policy_for: Any) -> None:
        """``policy_for(function_id) -> FunctionPolicy`` supplies each function's retry policy."""
        self.db = db
        self.policy_for = policy_for
        self._insert: Callable[..., Any]  # the dialect's insert(), with on_conflict_do_nothing()
        if db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            self._insert = sqlite_insert
        else:  # the PostgreSQL dialect only where it is used (importing it costs a cold start ~20 ms)
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            self._insert = pg_insert

    def _order_outputs(self, conn: Any, call_ids: Any) -> None:
        """Readers page through a call's outputs by id: on PostgreSQL a call's output ids are made to commit
        in order (:meth:`CoreHot.lock_calls <cloudmodal.server.hotsql_pg.CoreHot.lock_calls>`)."""
        if self.db.is_sqlite:
            return  # SQLite has a single writer: commit order is id order already
        from cloudmodal.server.hotsql_pg import CoreHot

        CoreHot(conn).lock_calls(call_ids)

    # -- producers ---------------------------------------------------------------------------------------
    @staticmethod
    def _input_rows(
        call_id: str,
        function_id: str,
        items: Sequence[tuple[int, str | None, bytes | None, str | None]],
        now: float,
        worker_id: str | None = None,
        lease_expires: float = 0.0,
    ) -> list[dict[str, Any]]:
        # a plain int: the sqlite3 driver binds an IntEnum member through its adapter look-up, ~0.5 µs a row
        state = int(InputState.PENDING if worker_id is None else InputState.CLAIMED)
        return [
            {
                "call_id": call_id,
                "function_id": function_id,
                "idx": idx,
                "method": method,
                "args": args,
                "args_blob": blob,
                "state": state,
                "attempts": 0,
                "crashes": 0,
                "worker_id": worker_id,
                "lease_expires": lease_expires,
                "available_at": 0.0,
                "created_at": now,
            }
            for idx, method, args, blob in items
        ]

    def put(
        self,
        call_id: str,
        function_id: str,
        items: Sequence[tuple[int, str | None, bytes | None, str | None]],
        hot: HotStatements | None = None,
    ) -> int:
        """Enqueue ``(idx, method, args, args_blob)`` items; re-sending an ``idx`` is a no-op.
        With ``hot``, inside the caller's transaction."""
        if not items:
            return 0
        rows = self._input_rows(call_id, function_id, items, time.time())
        if hot is not None:
            hot.insert_inputs(rows, returning=0)
        else:
            with self.db.hot() as h:
                h.insert_inputs(rows, returning=0)
        return len(rows)

    def put_claimed(
        self,
        hot: HotStatements,
        call_id: str,
        function_id: str,
        items: Sequence[tuple[int, str | None, bytes | None, str | None]],
        worker_id: str,
        lease_s: float,
    ) -> list[ClaimedInput]:
        """Enqueue items already claimed by ``worker_id`` (a worker that is waiting for work gets them
        without a second transaction), inside the caller's transaction. Re-sent ``idx``es are skipped."""
        if not items:
            return []
        return self.put_claimed_many(hot, call_id, function_id, [(worker_id, items)], lease_s)[0]

    def put_claimed_many(
        self,
        hot: HotStatements,
        call_id: str,
        function_id: str,
        chunks: Sequence[tuple[str, Sequence[tuple[int, str | None, bytes | None, str | None]]]],
        lease_s: float,
        pending: Sequence[tuple[int, str | None, bytes | None, str | None]] = (),
    ) -> list[list[ClaimedInput]]:
        """:meth:`put_claimed` for several workers' ``(worker_id, items)``, and the ``pending`` items
        (:meth:`put`), in one statement: each worker's claimed inputs, in ``chunks``' order."""
        now = time.time()
        rows: list[dict[str, Any]] = []
        for worker_id, items in chunks:
            rows += self._input_rows(call_id, function_id, items, now, worker_id, now + lease_s)
        n_claimed = len(rows)
        if pending:
            rows += self._input_rows(call_id, function_id, pending, now)
        if not rows:
            return []
        got = hot.insert_inputs(rows, returning=n_claimed)
        by_idx = {int(idx): int(iid) for iid, idx in got}
        return [
            [
                ClaimedInput(by_idx[idx], call_id, idx, method, args, blob, 0)
                for idx, method, args, blob in items
                if idx in by_idx
            ]
            for _, items in chunks
        ]

    # -- consumers ---------------------------------------------------------------------------------------
    def claim(
        self, function_id: str, worker_id: str, max_n: int, lease_s: float, now: float | None = None
    ) -> list[ClaimedInput]:
        """Up to ``max_n`` of the function's claimable inputs for one worker, in a transaction of its own."""
        with self.db.hot() as hot:
            return self.claim_in(hot, function_id, [(worker_id, max_n)], lease_s, now)[0]

    def pending_count(self, function_id: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self.db.read() as conn:
            return conn.execute(
                select(func.count())
                .select_from(I)
                .where(
                    and_(
                        I.c.function_id == function_id,
                        I.c.state == InputState.PENDING,
                        I.c.available_at <= now,
                    )
                )
            ).scalar_one()

    def counts(self) -> dict[str, tuple[int, int]]:
        """``function_id -> (pending, claimed)`` for every function with unfinished inputs."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(I.c.function_id, I.c.state, func.count())
                .where(I.c.state < InputState.DONE)
                .group_by(I.c.function_id, I.c.state)
            ).all()
        out: dict[str, list[int]] = {}
        for fid, state, n in rows:
            out.setdefault(fid, [0, 0])[state] += n
        return {k: (v[0], v[1]) for k, v in out.items()}

    def complete_rows(
        self, worker_id: str | None, items: Sequence[OutputItem], now: float | None = None
    ) -> tuple[set[str], dict[str, list[list[Any]]], dict[str, float]]:
        """Record outputs of inputs ``worker_id`` holds (None: the control plane's own, for any input) in a
        transaction of their own: :meth:`complete_in`."""
        if not items:
            return set(), {}, {}
        with self.db.hot() as hot:
            return self.complete_in(hot, [(worker_id, it) for it in items], now)

    def complete_in(
        self,
        hot: HotStatements,
        items: Sequence[tuple[str | None, OutputItem]],
        now: float | None = None,
    ) -> tuple[set[str], dict[str, list[list[Any]]], dict[str, float]]:
        """Record ``(worker id, output)`` pairs in ``hot``'s transaction, each for an input that worker holds
        (worker None: the control plane's own, for any input); failures with retries left are requeued with
        backoff. Returns the touched call ids and the output rows written, per call, in the form
        :meth:`fetch_outputs` reads them (``[id, idx, gen_index, status, data, data_blob]``), so waiting
        callers can be answered without reading them back; and, per function, when the first input requeued
        for a retry becomes claimable."""
        if not items:
            return set(), {}, {}
        now = time.time() if now is None else now
        ids = list({it.input_id for _, it in items})
        written: dict[str, list[list[Any]]] = {}
        meta = {r[0]: r for r in hot.input_meta(ids)}
        out_rows: list[dict[str, Any]] = []
        done_ids: list[int] = []
        requeue: list[tuple[int, int, float]] = []
        for worker_id, it in items:
            m = meta.get(it.input_id)
            if m is None or m[5] == InputState.DONE:
                continue  # unknown, or already answered (a duplicate delivery)
            if worker_id is not None and (m[6] != worker_id or m[5] != InputState.CLAIMED):
                # only the worker holding the input answers it: a worker whose lease was taken over
                # finished too late, and any other worker's answer is a forgery
                continue
            if it.status in RETRYABLE and it.retryable:
                policy = self.policy_for(m[3])
                if policy.retries is not None and m[4] < policy.retries.max_retries:
                    attempt = m[4] + 1
                    requeue.append((it.input_id, attempt, now + policy.retries.delay_for(attempt)))
                    continue
            out_rows.append(
                {
                    "input_id": it.input_id,
                    "call_id": m[1],
                    "idx": m[2],
                    "gen_index": it.gen_index,
                    "status": it.status,
                    "data": it.data,
                    "data_blob": it.data_blob,
                    "created_at": now,
                }
            )
            if it.gen_index < 0:
                done_ids.append(it.input_id)
        if out_rows:
            by_key = {(r["input_id"], r["gen_index"]): r for r in out_rows}
            for oid, input_id, gen_index in hot.insert_outputs(out_rows, done_ids):
                r = by_key[(input_id, gen_index)]
                written.setdefault(r["call_id"], []).append(
                    [oid, r["idx"], gen_index, r["status"], r["data"], r["data_blob"]]
                )
        retry_at: dict[str, float] = {}  # function id -> when its first requeued input becomes claimable
        for input_id, attempt, available_at in requeue:
            hot.requeue(input_id, attempt, available_at)
            fid = meta[input_id][3]
            retry_at[fid] = min(available_at, retry_at.get(fid, available_at))
        return {meta[i][1] for i in ids if i in meta}, written, retry_at

    def claim_in(
        self,
        hot: HotStatements,
        function_id: str,
        takers: Sequence[tuple[str, int]],
        lease_s: float,
        now: float | None = None,
    ) -> list[list[ClaimedInput]]:
        """Claims of several workers ``(worker id, up to n)`` on one function in ``hot``'s transaction, served
        oldest input first in ``takers``' order: each taker's inputs."""
        now = time.time() if now is None else now
        slots = [wid for wid, n in takers for _ in range(max(int(n), 1))]
        got: dict[str, list[ClaimedInput]] = {}
        for r in hot.claim_slots(function_id, now, now + lease_s, slots):
            got.setdefault(r[7], []).append(ClaimedInput(r[0], r[1], r[2], r[3], r[4], r[5], r[6]))
        for rows in got.values():
            rows.sort(key=lambda c: c.input_id, reverse=True)
        out = []
        for wid, n in takers:
            # a worker named twice gets its inputs in order, each claim up to its own n
            rows = got.get(wid, [])
            out.append([rows.pop() for _ in range(min(max(int(n), 1), len(rows)))])
        return out

    def release_worker(
        self,
        worker_id: str,
        *,
        crashed: bool,
        input_ids: Sequence[int] | None = None,
        now: float | None = None,
    ) -> tuple[int, list[str]]:
        """Requeue a worker's claimed inputs at once (drain, preemption, or death).

        ``crashed`` counts the death against each input's crash budget; inputs over budget end as errors.
        Returns (requeued count, call ids that got a final error).
        """
        now = time.time() if now is None else now
        cond = and_(I.c.worker_id == worker_id, I.c.state == InputState.CLAIMED)
        if input_ids is not None:
            cond = and_(cond, I.c.id.in_(list(input_ids)))
        return self._requeue(cond, crashed=crashed, now=now)

    def requeue_expired(self, now: float | None = None) -> tuple[int, list[str]]:
        now = time.time() if now is None else now
        return self._requeue(
            and_(I.c.state == InputState.CLAIMED, I.c.lease_expires < now), crashed=True, now=now
        )

    def _requeue(self, cond: Any, *, crashed: bool, now: float) -> tuple[int, list[str]]:
        with self.db.write() as conn:
            rows = conn.execute(
                select(I.c.id, I.c.function_id, I.c.crashes, I.c.call_id, I.c.idx, I.c.worker_id).where(cond)
            ).all()
            if not rows:
                return 0, []
            dead: list[Any] = []
            again: list[int] = []
            for r in rows:
                crashes = r[2] + (1 if crashed else 0)
                if crashed and crashes >= self.policy_for(r[1]).crash_budget:
                    dead.append(r)
                else:
                    again.append(r[0])
            if again:
                values: dict[str, Any] = {"state": InputState.PENDING, "worker_id": None, "available_at": now}
                if crashed:
                    values["crashes"] = I.c.crashes + 1
                conn.execute(
                    update(I).where(and_(I.c.id.in_(again), I.c.state == InputState.CLAIMED)).values(**values)
                )
            if dead:
                from cloudmodal.serialization import crash_failure_payload

                self._order_outputs(conn, [r[3] for r in dead])
                conn.execute(
                    update(I)
                    .where(I.c.id.in_([r[0] for r in dead]))
                    .values(state=InputState.DONE, crashes=I.c.crashes + 1, args=None)
                )
                conn.execute(
                    self._insert(O).on_conflict_do_nothing(index_elements=["input_id", "gen_index"]),
                    [
                        {
                            "input_id": r[0],
                            "call_id": r[3],
                            "idx": r[4],
                            "gen_index": -1,
                            "status": OutputStatus.CRASHED,
                            "data": crash_failure_payload(r[2] + 1),
                            "data_blob": None,
                            "created_at": now,
                        }
                        for r in dead
                    ],
                )
        return len(again), list({r[3] for r in dead})

    def cancel_call(self, call_id: str, now: float | None = None) -> list[int]:
        """Cancel a call: pending inputs end as cancelled; returns the claimed input ids to interrupt."""
        now = time.time() if now is None else now
        from cloudmodal.serialization import cancelled_payload

        with self.db.write() as conn:
            conn.execute(update(C).where(C.c.id == call_id).values(cancelled=True))
            rows = conn.execute(
                select(I.c.id, I.c.idx, I.c.state).where(
                    and_(I.c.call_id == call_id, I.c.state < InputState.DONE)
                )
            ).all()
            if rows:
                self._order_outputs(conn, [call_id])
                conn.execute(
                    self._insert(O).on_conflict_do_nothing(index_elements=["input_id", "gen_index"]),
                    [
                        {
                            "input_id": r[0],
                            "call_id": call_id,
                            "idx": r[1],
                            "gen_index": -1,
                            "status": OutputStatus.CANCELLED,
                            "data": cancelled_payload(),
                            "data_blob": None,
                            "created_at": now,
                        }
                        for r in rows
                    ],
                )
                conn.execute(
                    update(I).where(I.c.id.in_([r[0] for r in rows])).values(state=InputState.DONE, args=None)
                )
        return [r[0] for r in rows if r[2] == InputState.CLAIMED]

    def fail_pending(
        self, function_id: str, payload: bytes, status: str = OutputStatus.FAILURE, now: float | None = None
    ) -> list[str]:
        """End every unfinished input of a function with one error (e.g. its workers cannot start)."""
        now = time.time() if now is None else now
        with self.db.write() as conn:
            rows = conn.execute(
                select(I.c.id, I.c.call_id, I.c.idx).where(
                    and_(I.c.function_id == function_id, I.c.state < InputState.DONE)
                )
            ).all()
            if not rows:
                return []
            self._order_outputs(conn, [r[1] for r in rows])
            conn.execute(
                self._insert(O).on_conflict_do_nothing(index_elements=["input_id", "gen_index"]),
                [
                    {
                        "input_id": r[0],
                        "call_id": r[1],
                        "idx": r[2],
                        "gen_index": -1,
                        "status": status,
                        "data": payload,
                        "data_blob": None,
                        "created_at": now,
                    }
                    for r in rows
                ],
            )
            conn.execute(
                update(I).where(I.c.id.in_([r[0] for r in rows])).values(state=InputState.DONE, args=None)
            )
        return list({r[1] for r in rows})

    # -- results -----------------------------------------------------------------------------------------
    def fetch_outputs(
        self, call_id: str, after_id: int, limit: int, max_bytes: int = OUTPUTS_READ_BYTES
    ) -> list[tuple[Any, ...]]:
        """A call's outputs after ``after_id`` in id order: up to ``limit`` rows, ending at the first row
        that brings the inline data read to ``max_bytes`` (each row may carry up to 2 MiB: a page of 10,000
        would otherwise be read into the control plane's memory at once). Rows come from the database in
        parts of at most 128 (PostgreSQL: a server-side cursor), so a read holds at most ``max_bytes`` plus
        one part. The caller pages on by id."""
        query = (
            select(O.c.id, O.c.idx, O.c.gen_index, O.c.status, O.c.data, O.c.data_blob)
            .where(and_(O.c.call_id == call_id, O.c.id > after_id))
            .order_by(O.c.id)
            .limit(limit)
        )
        out: list[tuple[Any, ...]] = []
        held = 0
        with self.db.read() as conn:
            # in parts (PostgreSQL: a server-side cursor), so the read stops having read little more than
            # it returns; parts of 128 cost no more than one plain read for small rows (measured: 10,000)
            result = conn.execution_options(stream_results=True, max_row_buffer=128).execute(query)
            try:
                for r in result:
                    out.append(tuple(r))
                    held += len(r[4]) if r[4] is not None else 0
                    if held >= max_bytes:
                        break
            finally:
                result.close()
        return out

    def call_progress(self, call_id: str) -> tuple[int, int]:
        """(inputs known, inputs finished) of a call."""
        with self.db.read() as conn:
            total = conn.execute(
                select(func.count()).select_from(I).where(I.c.call_id == call_id)
            ).scalar_one()
            done = conn.execute(
                select(func.count())
                .select_from(I)
                .where(and_(I.c.call_id == call_id, I.c.state == InputState.DONE))
            ).scalar_one()
        return total, done


__all__ = ["InputQueue", "OutputItem", "ClaimedInput", "FunctionPolicy"]
