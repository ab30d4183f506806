"""The hot statements on PostgreSQL (see :mod:`cloudmodal.server.hotsql`): prebuilt SQLAlchemy Core
statements in an ordinary transaction. A module of its own so that SQLite deployments (the embedded default)
never import the PostgreSQL dialect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import BindParameter, bindparam, select, text, update
from sqlalchemy.dialects import postgresql

from cloudmodal.server import models
from cloudmodal.server.states import InputState

I = models.inputs  # noqa: E741
O = models.outputs  # noqa: E741
C = models.calls
F = models.functions


class CoreHot:
    """:class:`HotStatements` as prebuilt SQLAlchemy Core statements (PostgreSQL).

    On PostgreSQL ids are drawn at insert but become visible at commit, so two writers could commit a call's
    outputs out of id order and a reader paging by id would skip a row for good: a transaction-scoped
    advisory lock per call makes a call's output ids commit in order.
    """

    ids: BindParameter[Any] = bindparam("ids", expanding=True)
    sql_function_state = select(F.c.app_id, F.c.state).where(F.c.id == bindparam("fid"))
    sql_insert_call = postgresql.insert(C).on_conflict_do_nothing(index_elements=["id"])
    sql_touch = update(F).where(F.c.id == bindparam("fid")).values(last_active_at=bindparam("t"))
    sql_insert_input = postgresql.insert(I).on_conflict_do_nothing(index_elements=["call_id", "idx"])
    sql_insert_input_returning = sql_insert_input.returning(I.c.id, I.c.idx, sort_by_parameter_order=True)
    sql_input_meta = select(
        I.c.id, I.c.call_id, I.c.idx, I.c.function_id, I.c.attempts, I.c.state, I.c.worker_id
    ).where(I.c.id.in_(ids))
    sql_call_owner = select(C.c.function_id, C.c.created_by).where(C.c.id == bindparam("cid"))
    sql_insert_output = (
        postgresql.insert(O)
        .on_conflict_do_nothing(index_elements=["input_id", "gen_index"])
        .returning(O.c.id, O.c.input_id, O.c.gen_index, sort_by_parameter_order=True)
    )
    sql_inputs_done = update(I).where(I.c.id.in_(ids)).values(state=InputState.DONE, args=None)
    sql_requeue = (
        update(I)
        .where((I.c.id == bindparam("iid")) & (I.c.state < InputState.DONE))
        .values(
            state=InputState.PENDING,
            worker_id=None,
            attempts=bindparam("attempt"),
            available_at=bindparam("at"),
        )
    )
    sql_advisory = text("SELECT pg_advisory_xact_lock(hashtext(:c))")

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def function_state(self, function_id: str) -> tuple[str, str] | None:
        row = self.conn.execute(self.sql_function_state, {"fid": function_id}).first()
        return None if row is None else (row[0], row[1])

    def insert_call(self, values: dict[str, Any]) -> bool:
        return self.conn.execute(self.sql_insert_call, values).rowcount == 1

    def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        row = self.conn.execute(self.sql_call_owner, {"cid": call_id}).first()
        return (row[0], row[1]) if row is not None else None

    def touch_function(self, function_id: str, now: float) -> None:
        self.conn.execute(self.sql_touch, {"fid": function_id, "t": now})

    def insert_inputs(self, rows: Sequence[dict[str, Any]], *, returning: bool) -> list[tuple[int, int]]:
        if not returning:
            self.conn.execute(self.sql_insert_input, list(rows))
            return []
        return [(r[0], r[1]) for r in self.conn.execute(self.sql_insert_input_returning, list(rows)).all()]

    def input_meta(self, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(self.sql_input_meta, {"ids": list(ids)}).all()]

    def insert_outputs(self, rows: Sequence[dict[str, Any]]) -> list[tuple[int, int, int]]:
        for cid in sorted({r["call_id"] for r in rows}):
            self.conn.execute(self.sql_advisory, {"c": cid})
        got = self.conn.execute(self.sql_insert_output, list(rows)).all()
        return sorted((r[0], r[1], r[2]) for r in got)

    def inputs_done(self, ids: Sequence[int]) -> None:
        self.conn.execute(self.sql_inputs_done, {"ids": list(ids)})

    def requeue(self, input_id: int, attempt: int, available_at: float) -> None:
        self.conn.execute(self.sql_requeue, {"iid": input_id, "attempt": attempt, "at": available_at})
