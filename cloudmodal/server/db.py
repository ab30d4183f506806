"""Database engine: SQLite (WAL) by default, PostgreSQL through ``CLOUDMODAL_DATABASE_URL``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine

from cloudmodal.server import models  # registers the tables
from cloudmodal.server.hotsql import HotStatements, SqliteHotConnection


class Database:
    """An engine plus the write discipline its dialect needs.

    SQLite allows one writer at a time; rather than letting threads collide on ``SQLITE_BUSY`` we serialize
    writes in-process with a lock. PostgreSQL needs no lock (claims use ``FOR UPDATE SKIP LOCKED``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=16, max_overflow=16
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            models.use_postgresql_partial_indexes()
            self.engine = create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True)
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )
        models.metadata.create_all(self.engine)
        self._hot: SqliteHotConnection | None = None
        if self.is_sqlite:
            if not self.engine.url.database or self.engine.url.database == ":memory:":
                raise ValueError(
                    "The control plane needs an SQLite database file, not an in-memory database."
                )
            self._hot = SqliteHotConnection(self.engine.url.database, self._write_lock)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def hot(self) -> Iterator[HotStatements]:
        """A write transaction for the statements on every call's path (see :mod:`.hotsql`)."""
        if self._hot is not None:
            with self._hot.transaction() as h:
                yield h
        else:
            from cloudmodal.server.hotsql_pg import CoreHot

            with self.engine.begin() as conn:
                yield CoreHot(conn)

    def write_idle(self) -> bool:
        """SQLite with no write in progress: a short operation may run on the caller's thread (the
        server's event loop) instead of paying a thread hop. Never true on PostgreSQL, whose statements
        wait on the network."""
        return self.is_sqlite and not self._write_lock.locked()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a transaction that commits on exit (serialized on SQLite)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def dispose(self) -> None:
        if self._hot is not None:
            self._hot.close()
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
