"""Database engine: SQLite (WAL) by default, PostgreSQL through ``CLOUDMODAL_DATABASE_URL``."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Connection, Engine

from cloudmodal.server import migrations, models
from cloudmodal.server.hotsql import HotStatements, SqliteHotConnection, file_head

log = logging.getLogger("cloudmodal.server")

CHECKPOINT_INTERVAL_S = 0.5
IDLE_PING_S = 2.0  # a pooled PostgreSQL connection idle this long is pinged before it is handed out
RESTART_FRAMES = 1000  # WAL pages past which a checkpoint completes under the write lock (SQLite's default)


class Database:
    """An engine plus the write discipline its dialect needs.

    SQLite allows one writer at a time; rather than letting threads collide on ``SQLITE_BUSY`` we serialize
    writes in-process with a lock. PostgreSQL needs no lock (claims use ``FOR UPDATE SKIP LOCKED``).
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open the database at ``url`` and make it this release's schema (see :mod:`.migrations`): a new
        database is created, an older one upgraded (``migrate=False``: refused instead), a newer one
        refused. ``upgraded`` says what was done (None: the database was at this release's schema)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=16, max_overflow=16
            )
            if not self.engine.url.database or self.engine.url.database == ":memory:":
                raise ValueError(
                    "The control plane needs an SQLite database file, not an in-memory database."
                )
            event.listen(self.engine, "connect", _sqlite_pragmas)
            _private_sqlite_files(self.engine.url.database)
        else:
            models.use_postgresql_partial_indexes()
            self.engine = create_engine(url, pool_size=16, max_overflow=16)
            ping_idle_connections(self.engine)
        self._write_lock: Any = WriteLock() if self.is_sqlite else contextlib.nullcontext()
        try:
            self.upgraded = migrations.ensure(self.engine, apply=migrate)
        except BaseException:
            self.engine.dispose()
            raise
        if self.upgraded is not None:
            log.info("%s", self.upgraded.describe())
        self._hot: SqliteHotConnection | None = None
        if self.is_sqlite:
            assert self.engine.url.database is not None
            self._hot = SqliteHotConnection(self.engine.url.database, self._write_lock)
            self._checkpointer = Checkpointer(self.engine.url.database, self._write_lock)

    @contextlib.contextmanager
    def hot(self, *, one_statement: bool = False) -> Iterator[HotStatements]:
        """A write transaction for the statements on every call's path (see :mod:`.hotsql`).

        ``one_statement``: the caller runs a single statement, which on PostgreSQL is then its own
        transaction (autocommit: no ``BEGIN`` and ``COMMIT`` round trips; one round trip in all). Each
        round trip costs a thread waiting on the network and then on the GIL, which on a busy control
        plane is most of a short transaction's latency."""
        if self._hot is not None:
            with self._hot.transaction() as h:
                yield h
            return
        from cloudmodal.server.hotsql_pg import CoreHot

        if one_statement:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                yield CoreHot(conn, one_statement=True)
        else:
            with self.engine.begin() as conn:
                yield CoreHot(conn)

    def write_idle(self) -> bool:
        """SQLite with no write in progress: a short operation may run on the caller's thread (the
        server's event loop) instead of paying a thread hop. Never true on PostgreSQL, whose statements
        wait on the network."""
        return self.is_sqlite and not self._write_lock.locked()

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a transaction that commits on exit (serialized on SQLite)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A connection whose statements all see the database at one moment (a read made of several
        statements that must agree, such as a cost report's spans and its workers not accrued yet):
        ``REPEATABLE READ`` on PostgreSQL, one deferred transaction on SQLite (WAL readers see a snapshot)."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.rollback()
            return
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        if self._hot is not None:
            self._checkpointer.stop()
            self._hot.close()
        self.engine.dispose()


def ping_idle_connections(engine: Engine, idle_s: float = IDLE_PING_S) -> None:
    """Check a pooled connection before handing it out only when it has sat idle ``idle_s`` or more (the
    database may have restarted or closed it meanwhile): a dead one is replaced, as ``pool_pre_ping``
    does. Unlike ``pool_pre_ping``, a connection in steady use is not pinged, which would be a round trip
    on every transaction of the hot path. A connection that breaks while in use fails its transaction
    either way (:class:`~sqlalchemy.exc.DBAPIError` with ``connection_invalidated``) and is discarded."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["cloudmodal_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("cloudmodal_idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return  # new, or in use moments ago
        try:
            dbapi_conn.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as e:
            # the pool discards this connection and checks out another (up to three tries)
            raise exc.DisconnectionError(f"pooled connection is dead: {e}") from e


class Leadership:
    """Which of the control planes sharing a database reconciles it: the one holding this lock.

    Two control planes on one database (a restart overlapping the old process, or several for availability)
    may all serve the API, but only one may launch, stop and write off workers, or both would start a pool's
    workers and each would write off the other's. PostgreSQL: a session-level advisory lock on a connection
    of its own (released by the server when the holder dies). SQLite: an exclusive lock on a file beside the
    database (released by the OS when the holder dies). ``held()`` tries to take the lock when not holding it,
    and checks that it still holds it when it does.
    """

    KEY = 0x636D5F726563  # "cm_rec"

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None
        self._file: Any = None
        self.holding: bool | None = None  # None until first tried

    def held(self) -> bool:
        try:
            self.holding = self._sqlite() if self.db.is_sqlite else self._postgres()
        except Exception:
            log.warning(
                "could not check the reconciler lock; acting as a standby until it can", exc_info=True
            )
            self.release()
            self.holding = False
        return self.holding

    def _sqlite(self) -> bool:
        if self._file is None:
            from filelock import FileLock

            self._file = FileLock(f"{self.db.engine.url.database}.reconciler.lock", mode=0o600)
        if not self._file.is_locked:
            from filelock import Timeout

            try:
                self._file.acquire(timeout=0)
            except Timeout:
                return False
        return True

    def _postgres(self) -> bool:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))  # the lock lives as long as this session
                return True
            except Exception:
                self.release()  # the session is gone, and its lock with it: try again below
        # Autocommit: the session holds the lock, and must not hold a transaction open (an idle transaction
        # would keep PostgreSQL from vacuuming the queue's tables for as long as this control plane leads).
        conn = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.KEY}).scalar()
        if got:
            self._conn = conn
            return True
        conn.close()
        return False

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                # Unlocked first, so another control plane can take it the moment this returns (the server
                # ends a closed session's locks only once its backend notices the close).
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.KEY})
            except Exception:
                pass  # the session is gone already, and its lock with it
            try:
                # Closing would only return the session to the pool, still holding the lock: invalidating
                # closes it (and with it the lock), and the pool makes a fresh one when needed.
                conn.invalidate()
                conn.close()
            except Exception:
                pass
        if self._file is not None and self._file.is_locked:
            self._file.release()
        self.holding = False


class WriteLock:
    """The in-process lock every SQLite write takes, with a way in for a thread that must not wait behind a
    stream of writers.

    A ``threading.Lock`` goes to whichever thread asks first after a release: a writer committing in a loop
    re-takes it before a waiting thread has even woken, so under steady writes the checkpointer could wait for
    the lock as long as the writes last (and the log grow all that while). :meth:`first` makes writers that
    have not taken the lock yet step aside until it has been served."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted = 0  # threads waiting in first(); changed by them only

    def __enter__(self) -> WriteLock:
        while self._wanted:
            time.sleep(0.0002)
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        self._wanted += 1
        try:
            with self._lock:
                yield
        finally:
            self._wanted -= 1


class Checkpointer:
    """Moves SQLite's write-ahead log into the database file on a thread of its own.

    SQLite's default is to checkpoint inside the commit that crosses 1,000 WAL pages: every ~50th warm call
    paid a 3–5 ms stall for it (the p99 of a `.remote()` round trip). Every connection here turns that off
    (``wal_autocheckpoint=0``) and this thread checkpoints every ``interval`` seconds instead, in two steps:
    a ``PASSIVE`` checkpoint that waits for no reader or writer copies what is in the log (sqlite3 releases
    the GIL meanwhile); then, once the log holds ``restart_frames`` or more, a second one under the
    database's write lock copies the few frames committed during the first. The log starts over only at a
    write that begins after a complete checkpoint, which under steady writes racing the first step never
    happens (the log would only grow); the lock makes the next write such a one, and is held for the
    remainder only.
    """

    def __init__(
        self,
        path: str,
        write_lock: Any,
        interval: float | None = None,
        restart_frames: int | None = None,
    ) -> None:
        self.path = path
        self.write_lock = write_lock
        self.interval = CHECKPOINT_INTERVAL_S if interval is None else interval
        self.restart_frames = RESTART_FRAMES if restart_frames is None else restart_frames
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            while not self._stop.wait(self.interval):
                self.checkpoint(conn)
            self.checkpoint(conn, final=True)  # leave little for the next start to replay
        except Exception:  # a checkpoint that cannot run leaves SQLite's WAL to grow, not data at risk
            log.exception("SQLite checkpoints stopped")
        finally:
            if conn is not None:
                conn.close()

    def checkpoint(self, conn: sqlite3.Connection, *, final: bool = False) -> None:
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if final or frames >= self.restart_frames:
            with self.write_lock.first():
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)" if final else "PRAGMA wal_checkpoint(PASSIVE)")
        self.checkpoints += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _private_sqlite_files(database: str | None) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would make it 0644 under the usual umask),
    and take group/other access away from an existing one. SQLite gives the -wal and -shm files it creates
    the database file's mode; ones left by an earlier run are tightened here too."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        fd = os.open(database, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return  # SQLite reports a database it cannot open better than we would
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError as e:
        log.warning("could not make the database %s private (0600): %s", database, e)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal", ".reconciler.lock"):
        with contextlib.suppress(OSError):
            if os.stat(database + suffix).st_mode & 0o077:
                os.chmod(database + suffix, 0o600)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as e:  # "file is not a database": say what the file begins with instead
        path = next((row[2] for row in cur.execute("PRAGMA database_list") if row[1] == "main"), "")
        raise sqlite3.DatabaseError(f"{e} ({path} begins {file_head(path)})") from e
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's thread does it, off the write path
    cur.close()
