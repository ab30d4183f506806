"""The statements on every call's path, behind one small interface with two implementations.

A warm ``.remote()`` writes twice: the call and its input (claimed by a parked worker), then the output
(and the input marked done). Through SQLAlchemy Core each of those small statements costs several times
what SQLite spends executing it (statement objects, cache keys, execution contexts, result wrappers,
pool checkouts). So on SQLite these run as plain SQL on one dedicated DBAPI connection, under the write
lock every SQLite write takes anyway; on PostgreSQL they run as prebuilt Core statements in an ordinary
transaction. Both implementations are exercised by the whole test suite, which runs on both databases.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from cloudmodal.server.states import InputState

INPUT_COLUMNS = (
    "call_id",
    "function_id",
    "idx",
    "method",
    "args",
    "args_blob",
    "state",
    "attempts",
    "crashes",
    "worker_id",
    "lease_expires",
    "available_at",
    "created_at",
)
OUTPUT_COLUMNS = ("input_id", "call_id", "idx", "gen_index", "status", "data", "data_blob", "created_at")
CALL_COLUMNS = ("id", "function_id", "app_id", "kind", "created_at", "num_inputs", "cancelled", "created_by")


class HotStatements(Protocol):
    """One transaction's worth of the hot path's statements."""

    def function_state(self, function_id: str) -> tuple[str, str] | None:
        """(app id, state) of a function."""

    def insert_call(self, values: dict[str, Any]) -> bool:
        """Insert a call unless its id exists; whether it was inserted."""

    def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        """(function id, created by) of a call."""

    def touch_function(self, function_id: str, now: float) -> None: ...

    def insert_inputs(self, rows: Sequence[dict[str, Any]], *, returning: int) -> list[tuple[int, int]]:
        """Insert inputs, skipping an existing (call, idx): the (id, idx) inserted of at least the first
        ``returning`` rows (more may come back; 0: none wanted)."""

    def input_meta(self, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        """(id, call_id, idx, function_id, attempts, state, worker_id) of inputs."""

    def insert_outputs(
        self, rows: Sequence[dict[str, Any]], done_ids: Sequence[int] = ()
    ) -> list[tuple[int, int, int]]:
        """Insert outputs, skipping an existing (input, gen_index), and mark the inputs ``done_ids`` done;
        the (id, input_id, gen_index) inserted, in id order."""

    def requeue(self, input_id: int, attempt: int, available_at: float) -> None: ...

    def claim_slots(
        self, function_id: str, now: float, lease_expires: float, slots: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        """Claim up to ``len(slots)`` of the function's claimable inputs, oldest first, the k-th for worker
        ``slots[k]``: ``(id, call_id, idx, method, args, args_blob, attempts, worker_id)`` of each."""

    def beat_workers(
        self,
        beats: Sequence[tuple[str, int, bool]],
        now: float,
        held: Sequence[tuple[int, str]] = (),
        lease_expires: float = 0.0,
    ) -> list[tuple[str, str, str]]:
        """Heartbeats ``(worker id, in flight, idle)``: last heartbeat, in flight and idle since (kept from
        the first idle heartbeat of a run of them) of each; ``(id, state, function_id)`` of those found. The
        leases of ``held`` ``(input id, worker id)`` are extended to ``lease_expires``: only inputs claimed
        by that worker, of workers found."""


class SqliteHot:
    """:class:`HotStatements` as plain SQL on a sqlite3 cursor inside ``BEGIN IMMEDIATE``."""

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self.cur = cur

    def function_state(self, function_id: str) -> tuple[str, str] | None:
        return self.cur.execute("SELECT app_id, state FROM function WHERE id = ?", (function_id,)).fetchone()

    def insert_call(self, values: dict[str, Any]) -> bool:
        self.cur.execute(
            'INSERT INTO "call" (id, function_id, app_id, kind, created_at, num_inputs, cancelled, created_by) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            tuple(values[c] for c in CALL_COLUMNS),
        )
        return self.cur.rowcount == 1

    def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        return self.cur.execute(
            'SELECT function_id, created_by FROM "call" WHERE id = ?', (call_id,)
        ).fetchone()

    def touch_function(self, function_id: str, now: float) -> None:
        self.cur.execute("UPDATE function SET last_active_at = ? WHERE id = ?", (now, function_id))

    _INSERT_INPUT = (
        f"INSERT INTO input ({', '.join(INPUT_COLUMNS)}) VALUES ({', '.join('?' * len(INPUT_COLUMNS))}) "
        "ON CONFLICT (call_id, idx) DO NOTHING"
    )

    def insert_inputs(self, rows: Sequence[dict[str, Any]], *, returning: int) -> list[tuple[int, int]]:
        params = [tuple(r[c] for c in INPUT_COLUMNS) for r in rows]
        out = []
        for p in params[:returning]:
            got = self.cur.execute(self._INSERT_INPUT + " RETURNING id, idx", p).fetchone()
            if got is not None:
                out.append((got[0], got[1]))
        if len(params) > returning:
            self.cur.executemany(self._INSERT_INPUT, params[returning:])
        return out

    def input_meta(self, ids: Sequence[int]) -> list[tuple[Any, ...]]:
        marks = ", ".join("?" * len(ids))
        return self.cur.execute(
            f"SELECT id, call_id, idx, function_id, attempts, state, worker_id FROM input WHERE id IN ({marks})",
            tuple(ids),
        ).fetchall()

    _INSERT_OUTPUT = (
        f"INSERT INTO output ({', '.join(OUTPUT_COLUMNS)}) VALUES ({', '.join('?' * len(OUTPUT_COLUMNS))}) "
        "ON CONFLICT (input_id, gen_index) DO NOTHING RETURNING id, input_id, gen_index"
    )

    _INPUTS_DONE = f"UPDATE input SET state = {InputState.DONE:d}, args = NULL WHERE id IN "

    def insert_outputs(
        self, rows: Sequence[dict[str, Any]], done_ids: Sequence[int] = ()
    ) -> list[tuple[int, int, int]]:
        out = []
        for r in rows:
            got = self.cur.execute(self._INSERT_OUTPUT, tuple(r[c] for c in OUTPUT_COLUMNS)).fetchone()
            if got is not None:
                out.append((got[0], got[1], got[2]))
        if done_ids:
            self.cur.execute(f"{self._INPUTS_DONE}({', '.join('?' * len(done_ids))})", tuple(done_ids))
        return out

    _REQUEUE = (
        f"UPDATE input SET state = {InputState.PENDING:d}, worker_id = NULL, attempts = ?, available_at = ? "
        f"WHERE id = ? AND state < {InputState.DONE:d}"
    )

    def requeue(self, input_id: int, attempt: int, available_at: float) -> None:
        self.cur.execute(self._REQUEUE, (attempt, available_at, input_id))

    _CLAIM = (
        f"UPDATE input SET state = {InputState.CLAIMED:d}, worker_id = ?, lease_expires = ? WHERE id IN "
        f"(SELECT id FROM input WHERE function_id = ? AND state = {InputState.PENDING:d} AND available_at <= ? "
        "ORDER BY id LIMIT ?) RETURNING id, call_id, idx, method, args, args_blob, attempts, worker_id"
    )

    def claim_slots(
        self, function_id: str, now: float, lease_expires: float, slots: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        # one statement per run of one worker's slots (SQLite is the only writer: the oldest rows are free)
        out: list[tuple[Any, ...]] = []
        i = 0
        while i < len(slots):
            j = i
            while j < len(slots) and slots[j] == slots[i]:
                j += 1
            got = self.cur.execute(self._CLAIM, (slots[i], lease_expires, function_id, now, j - i)).fetchall()
            out += sorted(got)
            if len(got) < j - i:
                break  # the function has no more
            i = j
        return out

    _BEAT = (
        "UPDATE worker SET last_heartbeat = ?, in_flight = ?, "
        "idle_since = CASE WHEN ? THEN coalesce(idle_since, ?) ELSE NULL END WHERE id = ? "
        "RETURNING id, state, function_id"
    )

    def beat_workers(
        self,
        beats: Sequence[tuple[str, int, bool]],
        now: float,
        held: Sequence[tuple[int, str]] = (),
        lease_expires: float = 0.0,
    ) -> list[tuple[str, str, str]]:
        out = []
        for wid, n, idle in beats:
            got = self.cur.execute(self._BEAT, (now, n, idle, now, wid)).fetchone()
            if got is not None:
                out.append((got[0], got[1], got[2]))
        found = {r[0] for r in out}
        renew = [(lease_expires, iid, wid) for iid, wid in held if wid in found]
        if renew:
            self.cur.executemany(self._RENEW, renew)
        return out

    _RENEW = f"UPDATE input SET lease_expires = ? WHERE id = ? AND worker_id = ? AND state = {InputState.CLAIMED:d}"


class SqliteHotConnection:
    """The dedicated sqlite3 connection of :class:`SqliteHot`, used only under the database's write lock."""

    def __init__(self, path: str, write_lock: Any) -> None:
        self.path = path
        self.lock = write_lock
        self._conn: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqliteHot]:
        with self.lock:
            if self._conn is None:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                except sqlite3.DatabaseError as e:
                    conn.close()
                    raise sqlite3.DatabaseError(f"{e} ({self.path} begins {file_head(self.path)})") from e
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("PRAGMA wal_autocheckpoint=0")  # see db.Checkpointer
                self._conn = conn
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteHot(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def file_head(path: str) -> str:
    """The first bytes of ``path``, for an error that says the file is not a database (what overwrote it)."""
    try:
        with open(path, "rb") as f:
            return repr(f.read(64))
    except OSError as e:
        return f"<unreadable: {e}>"
