"""The write transaction of a Dict or Queue operation (:mod:`.svc_kv`): its statements, pipelined on
PostgreSQL.

On PostgreSQL the connection is in pipeline mode: a statement is sent without waiting for its answer, and the
answers come back together when one of them is read (or at the commit). A write is then one or two round
trips to the database instead of one per statement plus ``BEGIN`` and ``COMMIT``, and each round trip is also
a wait for the scheduler on a busy machine. The statements that may run before an answer is read are written
so that they do nothing when a check they depend on fails (see the guards in :mod:`.svc_kv` and
:mod:`.kv_requests`). SQLite runs each statement at once.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from cloudmodal.server.db import Database

# A statement carrying more data is sent out of pipeline mode: the round trips saved do not matter next to the
# data, and psycopg 3.3's pipeline stalled sending 20 MiB in one statement (the server waiting for its rest)
PIPELINE_MAX_BYTES = 1024 * 1024

# engine -> whether its PostgreSQL compresses out-of-line values with lz4 (PostgreSQL 14+ built with lz4)
_LZ4: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


class Tx:
    """The statements of one write transaction, on its driver connection (``?`` placeholders)."""

    def __init__(self, raw: Any, sqlite: bool, pipeline: contextlib.ExitStack | None, *, lz4: bool) -> None:
        self.raw = raw
        self.sqlite = sqlite
        self.lz4 = lz4  # PostgreSQL can compress a big value with lz4 (see kv_requests.record)
        self._pipeline = pipeline  # the pipeline's context while in pipeline mode
        self.claimed = False  # this transaction holds a request id's row (see kv_requests.send_claim)
        self.recorded = False  # ... and filled it with its answer

    def run(self, sql: str, params: Sequence[Any] = (), *, size: int = 0) -> Any:
        """Send ``sql`` (carrying ``size`` bytes of data); something to read its rows from when needed
        (``fetchone``, ``fetchall``).

        SQLite: the statement runs to its end now and its rows are kept. One left unfinished would keep its
        read snapshot open after the transaction, on a connection that goes back to the pool (its next write
        would then fail at once, "database is locked", when another write committed since), and slows the
        statements run meanwhile (a 500-row delete by a third)."""
        if self.sqlite:
            cur = self.raw.cursor()
            try:
                cur.execute(sql, params)
                return _Rows(cur.fetchall())
            finally:
                cur.close()
        if size > PIPELINE_MAX_BYTES and self._pipeline is not None:
            self._pipeline.close()  # answers what was sent; the transaction goes on
            self._pipeline = None
        cur = self.raw.cursor()
        cur.execute(sql.replace("?", "%s"), params)
        return cur

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """SQLite only: one prepared statement over ``rows``."""
        self.raw.executemany(sql, rows)

    def commit(self) -> None:
        """PostgreSQL: commit now, with the statements still in flight (one round trip for all of them).
        SQLite: left to the write transaction's end."""
        if not self.sqlite:
            self.raw.commit()

    def rollback(self) -> None:
        """Undo what was sent (the write transaction then has nothing left to commit)."""
        self.raw.rollback()


class _Rows:
    """The rows of a finished SQLite statement, read as from a cursor."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows
        self._next = 0

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows, self._next = self._rows[self._next :], len(self._rows)
        return rows


def _lz4(conn: Connection) -> bool:
    engine = conn.engine
    if engine not in _LZ4:
        found = conn.exec_driver_sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar()
        _LZ4[engine] = bool(found)
    return _LZ4[engine]


@contextlib.contextmanager
def transaction(db: Database, conn: Connection, *, durable: bool = True) -> Iterator[Tx]:
    """``conn``'s write transaction (from ``db.write()``) as a :class:`Tx`, pipelined on PostgreSQL. A
    transaction that claimed a request id but recorded no answer is rolled back here (it changed nothing).

    ``durable=False`` (PostgreSQL): the commit answers without waiting for its WAL to reach the disk
    (``synchronous_commit = off`` for this transaction). The database stays consistent, but a crash of the
    database server or its machine may lose the transactions of the last moments (up to three times
    ``wal_writer_delay``, 0.6 s by default) after they were answered."""
    raw = conn.connection.dbapi_connection
    with contextlib.ExitStack() as pipeline:
        lz4 = False
        if not db.is_sqlite:
            lz4 = _lz4(conn)
            pipeline.enter_context(raw.pipeline())  # type: ignore[union-attr]  # psycopg's connection
        tx = Tx(raw, db.is_sqlite, pipeline if not db.is_sqlite else None, lz4=lz4)
        if not durable and not db.is_sqlite:
            tx.run("SET LOCAL synchronous_commit = off")
        yield tx
        if tx.claimed and not tx.recorded:
            tx.rollback()  # changed nothing (or answered a record): the claim goes, nothing to commit


__all__ = ["PIPELINE_MAX_BYTES", "Tx", "transaction"]
