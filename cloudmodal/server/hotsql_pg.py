"""The hot statements on PostgreSQL (see :mod:`cloudmodal.server.hotsql`): prebuilt SQLAlchemy Core
statements in an ordinary transaction, and for the statements whose size grows with a batch (inserting
inputs and outputs, reading and finishing inputs by id) plain SQL on the transaction's psycopg connection
with one array per column or list of ids. A batch's statement is then the same short text whatever its size:
psycopg parses it once and caches it, instead of parsing (with a Python regex) the multi-``VALUES`` or
expanded-``IN`` text SQLAlchemy renders for each batch, and no SQLAlchemy bind parameter is made per value.
A module of its own so that SQLite deployments (the embedded default) never import the PostgreSQL dialect."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql

from cloudmodal.server import models
from cloudmodal.server.hotsql import INPUT_COLUMNS, OUTPUT_COLUMNS
from cloudmodal.server.states import InputState

I = models.inputs  # noqa: E741
O = models.outputs  # noqa: E741
C = models.calls
F = models.functions
W = models.workers


def _arrays_insert(table: Any, columns: Sequence[str], conflict: str, returning: str) -> str:
    """``INSERT ... SELECT * FROM unnest(<one array per column>)``: a batch of rows as one array per column."""
    dialect = postgresql.dialect()
    casts = ", ".join(f"%s::{table.c[c].type.compile(dialect=dialect)}[]" for c in columns)
    cols = ", ".join(columns)
    return (
        f'INSERT INTO "{table.name}" ({cols}) SELECT * FROM unnest({casts}) '
        f"ON CONFLICT ({conflict}) DO NOTHING RETURNING {returning}"
    )


FLOAT_COLUMNS = frozenset({"lease_expires", "available_at", "created_at"})  # psycopg will not mix int/float


class CoreHot:
    """:class:`HotStatements` as prebuilt SQLAlchemy Core statements (PostgreSQL).

    On PostgreSQL ids are drawn at insert but become visible at commit, so two writers could commit a call's
    outputs out of id order and a reader paging by id would skip a row for good: a transaction-scoped
    advisory lock per call makes a call's output ids commit in order.
    """

    sql_function_state = select(F.c.app_id, F.c.state).where(F.c.id == bindparam("fid"))
    sql_insert_call = postgresql.insert(C).on_conflict_do_nothing(index_elements=["id"])
    sql_touch = update(F).where(F.c.id == bindparam("fid")).values(last_active_at=bindparam("t"))
    sql_call_owner = select(C.c.function_id, C.c.created_by).where(C.c.id == bindparam("cid"))
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
    raw_insert_inputs = _arrays_insert(I, INPUT_COLUMNS, "call_id, idx", "id, idx")
    raw_insert_outputs = _arrays_insert(O, OUTPUT_COLUMNS, "input_id, gen_index", "id, input_id, gen_index")
    # the same, and the inputs answered marked done, in one statement (one round trip)
    raw_insert_outputs_done = (
        f'WITH done AS (UPDATE "{I.name}" SET state = {int(InputState.DONE)}, args = NULL '
        "WHERE id = ANY(%s::bigint[])) " + raw_insert_outputs
    )
    raw_input_meta = (
        f'SELECT id, call_id, idx, function_id, attempts, state, worker_id FROM "{I.name}" '
        "WHERE id = ANY(%s::bigint[])"
    )
    # the calls' locks in one statement, in a fixed order (two writers never wait on each other in a cycle)
    raw_advisory = "SELECT pg_advisory_xact_lock(hashtext(c)) FROM unnest(%s::text[]) AS c ORDER BY c"
    # the k-th claimable input (oldest first; rows another transaction holds are skipped) for the k-th slot
    raw_claim_slots = (
        f'WITH picked AS (SELECT id, row_number() OVER (ORDER BY id) AS k FROM (SELECT id FROM "{I.name}" '
        f"WHERE function_id = %(fid)s AND state = {int(InputState.PENDING)} AND available_at <= %(now)s "
        "ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED) AS s) "
        f'UPDATE "{I.name}" AS i SET state = {int(InputState.CLAIMED)}, worker_id = (%(slots)s::text[])[p.k], '
        "lease_expires = %(lease)s FROM picked AS p WHERE i.id = p.id "
        "RETURNING i.id, i.call_id, i.idx, i.method, i.args, i.args_blob, i.attempts, i.worker_id"
    )
    # heartbeats, and the leases of the inputs each worker found holds, in one statement
    raw_beat_workers = (
        f'WITH b AS (UPDATE "{W.name}" AS w SET last_heartbeat = %(now)s, in_flight = b.n, '
        "idle_since = CASE WHEN b.idle THEN coalesce(w.idle_since, %(now)s) ELSE NULL END "
        "FROM unnest(%(wids)s::text[], %(ns)s::int[], %(idles)s::bool[]) AS b(id, n, idle) WHERE w.id = b.id "
        "RETURNING w.id, w.state, w.function_id), "
        f'r AS (UPDATE "{I.name}" AS i SET lease_expires = %(lease)s '
        "FROM unnest(%(ids)s::bigint[], %(hwids)s::text[]) AS h(id, wid) "
        f"WHERE i.id = h.id AND i.worker_id = h.wid AND i.state = {int(InputState.CLAIMED)} "
        "AND h.wid IN (SELECT id FROM b)) "
        "SELECT id, state, function_id FROM b"
    )

    def __init__(self, conn: Any, *, one_statement: bool = False) -> None:
        """``one_statement``: ``conn`` is in autocommit mode and may run one statement (its own
        transaction); a second one raises instead of committing apart from the first."""
        self.conn = conn
        self._cur: Any = None
        self._left: int | None = 1 if one_statement else None

    def _spend(self) -> None:
        if self._left is not None:
            if self._left <= 0:
                raise RuntimeError("a second statement in a one-statement transaction")
            self._left -= 1

    def _core(self, statement: Any, params: dict[str, Any]) -> Any:
        self._spend()
        return self.conn.execute(statement, params)

    def _raw(self) -> Any:
        """A cursor on the transaction's own psycopg connection (same transaction as ``conn``), for one
        statement."""
        self._spend()
        if self._cur is None:
            self._cur = self.conn.connection.driver_connection.cursor()
        return self._cur

    @staticmethod
    def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[list[Any]]:
        out = [[r[c] for r in rows] for c in columns]
        for i, c in enumerate(columns):
            if c in FLOAT_COLUMNS:
                out[i] = [float(v) for v in out[i]]
        return out

    def function_state(self, function_id: str) -> tuple[str, str] | None:
        row = self._core(self.sql_function_state, {"fid": function_id}).first()
        return None if row is None else (row[0], row[1])

    def insert_call(self, values: dict[str, Any]) -> bool:
        return self._core(self.sql_insert_call, values).rowcount == 1

    def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        row = self._core(self.sql_call_owner, {"cid": call_id}).first()
        return (row[0], row[1]) if row is not None else None

    def touch_function(self, function_id: str, now: float) -> None:
        self._core(self.sql_touch, {"fid": function_id, "t": now})

    def insert_inputs(self, rows: Sequence[dict[str, Any]], *, returning: int) -> list[tuple[int, int]]:
        if not rows:
            return []
        cur = self._raw()
        cur.execute(self.raw_insert_inputs, self._columns(rows, INPUT_COLUMNS))
        got = cur.fetchall()
        return [(r[0], r[1]) for r in got] if returning else []

    def input_meta(self, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        cur = self._raw()
        cur.execute(self.raw_input_meta, [list(ids)])
        return [tuple(r) for r in cur.fetchall()]

    def lock_calls(self, call_ids: Iterable[str]) -> None:
        """Make these calls' output ids commit in id order (see the class): their transaction-scoped
        advisory locks, taken in one statement in a fixed order."""
        self._raw().execute(self.raw_advisory, [sorted(set(call_ids))])

    def insert_outputs(
        self, rows: Sequence[dict[str, Any]], done_ids: Sequence[int] = ()
    ) -> list[tuple[int, int, int]]:
        self.lock_calls(r["call_id"] for r in rows)
        cur = self._raw()
        columns = self._columns(rows, OUTPUT_COLUMNS)
        if done_ids:
            cur.execute(self.raw_insert_outputs_done, [list(done_ids), *columns])
        else:
            cur.execute(self.raw_insert_outputs, columns)
        return sorted((r[0], r[1], r[2]) for r in cur.fetchall())

    def requeue(self, input_id: int, attempt: int, available_at: float) -> None:
        self._core(self.sql_requeue, {"iid": input_id, "attempt": attempt, "at": available_at})

    def claim_slots(
        self, function_id: str, now: float, lease_expires: float, slots: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        if not slots:
            return []
        cur = self._raw()
        params = {"fid": function_id, "now": float(now), "n": len(slots), "slots": list(slots)}
        cur.execute(self.raw_claim_slots, params | {"lease": float(lease_expires)})
        return [tuple(r) for r in cur.fetchall()]

    def beat_workers(
        self,
        beats: Sequence[tuple[str, int, bool]],
        now: float,
        held: Sequence[tuple[int, str]] = (),
        lease_expires: float = 0.0,
    ) -> list[tuple[str, str, str]]:
        if not beats:
            return []
        cur = self._raw()
        cur.execute(
            self.raw_beat_workers,
            {
                "now": float(now),
                "wids": [b[0] for b in beats],
                "ns": [int(b[1]) for b in beats],
                "idles": [bool(b[2]) for b in beats],
                "lease": float(lease_expires),
                "ids": [h[0] for h in held],
                "hwids": [h[1] for h in held],
            },
        )
        return [(r[0], r[1], r[2]) for r in cur.fetchall()]
