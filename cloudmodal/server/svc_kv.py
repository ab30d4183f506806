"""Dicts and Queues on the control plane's database: every statement they run (the HTTP side is
:mod:`.api_kv`, the client :mod:`cloudmodal.dict` / :mod:`cloudmodal.queue`).

Keys and values are opaque bytes here (the client pickles them; the server never unpickles). The limits are
Modal's, named in the client modules (the one place they are written down), and checked here again.

Concurrency: on SQLite every write transaction holds the process's write lock, so each operation is atomic
by construction. On PostgreSQL:

- a write takes a key-share lock on its object's row (``FOR KEY SHARE``) and deleting the object an
  exclusive one, so no write lands in an object being deleted (no orphaned rows); refreshing the object's
  ``last_used_at`` (a write now and then, a heartbeat) does not conflict with the key-share locks of writes in
  progress;
- every writer of a queue partition (put, get, clear, the pruner) locks its partition row first, then its
  items: one lock order, no deadlocks, and one writer of a partition at a time, so a get deletes the first
  ``n`` items it sees without locking them first, and each item is handed to exactly one getter (two deletes of
  one row could not both return it anyway);
- dict writes are single upserts (``INSERT ... ON CONFLICT``) over their keys in key-hash order (two updates
  of overlapping keys lock them in one order), and ``pop`` a ``DELETE ... RETURNING``: two racing
  ``put(skip_if_exists=True)`` of one key store exactly one, two racing pops return the value once.

Statements are pipelined (:mod:`.kv_tx`); a write sent before the answers it depends on are read is guarded
in SQL so that it does nothing when they would have stopped it. Non-idempotent requests carry request ids
(:mod:`.kv_requests`): a retry answers the first attempt's answer and changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Table, and_, delete, func, select, update
from sqlalchemy.engine import Connection

from cloudmodal import exception as exc
from cloudmodal.dict import DICT_LEN_CAP, MAX_DICT_KEY, MAX_DICT_REQUEST, MAX_DICT_VALUE
from cloudmodal.ids import new_id
from cloudmodal.queue import (
    MAX_PARTITION_BYTES,
    MAX_PARTITION_ITEMS,
    MAX_PARTITIONS,
    MAX_QUEUE_ITEM,
    MAX_TTL_S,
)
from cloudmodal.server import kv_requests
from cloudmodal.server import models_kv as kv
from cloudmodal.server.kv_requests import REQUEST_KEEP_S
from cloudmodal.server.kv_tx import Tx, transaction

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

Kind = Literal["dict", "queue"]
EPHEMERAL_IDLE_S = 600.0  # an ephemeral object whose client stopped heartbeating this long is deleted
DICT_IDLE_S = 7 * 86400.0  # a dict entry neither written nor read this long is deleted (Modal's rule)
READ_TOUCH_S = 86400.0  # a read refreshes an entry's idle clock when it is older than this (not every read)
TOUCH_OBJECT_S = 60.0  # an object's last_used_at is refreshed by writes at most this often
PAGE_BYTES = 16 * 1024 * 1024  # a scan or peek page stops after this many bytes (at least one row)
PRUNE_BATCH = 500  # rows per pruning transaction: short holds of the write lock
# Idle dict entries are looked for at most this often (per control plane): on PostgreSQL their ``updated_at``
# index is BRIN (models_kv), whose ranges keep the oldest time they ever held, so once entries were pruned or
# rewritten the look-up reads most of the table's pages even when nothing is idle. Hourly, that is cheap, and
# an entry goes at most an hour after its 7 idle days.
DICT_PRUNE_EVERY_S = 3600.0
_dict_prunes: weakref.WeakKeyDictionary[ControlPlane, float] = weakref.WeakKeyDictionary()  # cp -> last


@dataclass(frozen=True)
class _KindInfo:
    label: str  # "Dict"
    prefix: str  # "di"
    table: Table


KINDS: dict[str, _KindInfo] = {
    "dict": _KindInfo("Dict", "di", kv.dicts),
    "queue": _KindInfo("Queue", "qu", kv.queues),
}


# ``queue_partitions.c.items`` would be the column collection's ``items()`` method
P_ITEMS = kv.queue_partitions.c["items"]


# Multi-row writes. SQLite: the driver's executemany on one prepared statement.
_UPSERT_ENTRIES = (
    "INSERT INTO kv_dict_entry (dict_id, key_hash, key, value, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (dict_id, key_hash) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)
_INSERT_NEW_ENTRIES = (
    "INSERT INTO kv_dict_entry (dict_id, key_hash, key, value, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (dict_id, key_hash) DO NOTHING"
)
_INSERT_ITEMS = "INSERT INTO kv_queue_item (queue_id, partition, value, created_at) VALUES (?, ?, ?, ?)"
# PostgreSQL: the same over arrays (unnest), one statement and one round trip whatever the rows; sent before
# the dict's lock is read, so it writes only into a dict that exists (the guard's further conditions follow)
_PG_ENTRIES = (
    "INSERT INTO kv_dict_entry (dict_id, key_hash, key, value, updated_at) "
    "SELECT %s, h, k, v, %s FROM unnest(%b::bytea[], %b::bytea[], %b::bytea[]) AS t(h, k, v) "
    "WHERE EXISTS (SELECT 1 FROM kv_dict WHERE id = %s)"
)
_PG_ON_CONFLICT = {
    False: " ON CONFLICT (dict_id, key_hash) DO UPDATE "
    "SET value = excluded.value, updated_at = excluded.updated_at",
    True: " ON CONFLICT (dict_id, key_hash) DO NOTHING",  # skip_if_exists
}
_PG_INSERT_ITEMS = (
    "INSERT INTO kv_queue_item (queue_id, partition, value, created_at) "
    "SELECT %s, %s, v, %s FROM unnest(%b::bytea[]) WITH ORDINALITY AS t(v, i) ORDER BY i"
)
# A get's items: the first ``n`` of the partition, while it is alive. Sent before the partition's row is read
# (its lock is taken by the statement before), so it takes nothing from an expired or missing partition; an
# empty one is not scanned at all (the guards are evaluated first, once). Without row locks: the partition's
# lock already makes this the partition's only writer. PostgreSQL takes the items with an id up to the n-th
# one's (in one snapshot exactly the first n: an index range, where the id list cost a join); SQLite the ids
# listed (its rowid look-ups beat the range there).
_TAKE_PG = (
    "DELETE FROM kv_queue_item WHERE id <= (SELECT max(id) FROM (SELECT id FROM kv_queue_item "
    "WHERE queue_id = ? AND partition = ? ORDER BY id LIMIT ?) AS f) AND queue_id = ? AND partition = ?"
)
_TAKE_SQLITE = (
    "DELETE FROM kv_queue_item WHERE id IN (SELECT id FROM kv_queue_item WHERE queue_id = ? AND partition = ? "
    "ORDER BY id LIMIT ?)"
)
_TAKE_ALIVE = (
    " AND EXISTS (SELECT 1 FROM kv_queue_partition WHERE queue_id = ? AND partition = ? AND expires_at >= ? "
    "AND items > 0)"
)


class QueueFull(Exception):
    """A put does not fit its partition now (other items fill it): the caller may wait for space."""


def key_hash(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _object_row(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "ephemeral": bool(row.ephemeral),
        "created_at": row.created_at,
        "created_by": row.created_by,
        "last_used_at": row.last_used_at,
    }


class KV:
    """The dict and queue operations of one control plane (see the module's docstring)."""

    def __init__(self, cp: ControlPlane, *, durable: bool = True) -> None:
        """``durable=False``: writes answer before their commit reaches the disk (see
        :func:`.kv_tx.transaction`; PostgreSQL only, an opt-in durability trade)."""
        self.cp = cp
        self.db = cp.db
        self.durable = durable
        self._touched: dict[str, float] = {}  # object id -> when this process last refreshed last_used_at

    # -- helpers ---------------------------------------------------------------------------------
    def _q(self, sql: str) -> str:
        """A hot statement written with ``?`` placeholders, in the driver's paramstyle (the hot paths skip
        SQLAlchemy's statement building, which costs several times SQLite's own work on a one-row write)."""
        return sql if self.db.is_sqlite else sql.replace("?", "%s")

    def _touch_due(self, oid: str, now: float) -> bool:
        """Whether a write now should refresh the object's last_used_at (at most every TOUCH_OBJECT_S)."""
        if now - self._touched.get(oid, 0.0) <= TOUCH_OBJECT_S:
            return False
        if len(self._touched) > 100_000:  # bounded: forgetting only costs an early refresh
            self._touched.clear()
        self._touched[oid] = now
        return True

    def _lock_object(self, conn: Connection, kind: Kind, oid: str, now: float) -> None:
        """In a write: the object exists (else NotFoundError), key-share-locked against its deletion until the
        transaction ends; its last_used_at refreshed now and then."""
        table = KINDS[kind].table.name
        share = "" if self.db.is_sqlite else " FOR KEY SHARE"
        found = conn.exec_driver_sql(self._q(f"SELECT id FROM {table} WHERE id = ?{share}"), (oid,)).first()
        if found is None:
            raise _missing(kind, oid)
        if self._touch_due(oid, now):
            conn.exec_driver_sql(self._q(f"UPDATE {table} SET last_used_at = ? WHERE id = ?"), (now, oid))

    def _tx(self, conn: Connection) -> contextlib.AbstractContextManager[Tx]:
        return transaction(self.db, conn, durable=self.durable)

    def _send_lock(self, tx: Tx, kind: Kind, oid: str, now: float) -> Any:
        """Send the object's lock (see :meth:`_lock_object`), and the refresh of its last_used_at when due (of
        an absent object it changes nothing); read the lock with :func:`_locked`."""
        table = KINDS[kind].table.name
        share = "" if self.db.is_sqlite else " FOR KEY SHARE"
        lock = tx.run(f"SELECT id FROM {table} WHERE id = ?{share}", (oid,))
        if self._touch_due(oid, now):
            tx.run(f"UPDATE {table} SET last_used_at = ? WHERE id = ?", (now, oid))
        return lock

    def _exists(self, conn: Connection, kind: Kind, oid: str) -> None:
        table = KINDS[kind].table.name
        if conn.exec_driver_sql(self._q(f"SELECT id FROM {table} WHERE id = ?"), (oid,)).first() is None:
            raise _missing(kind, oid)

    # -- objects -----------------------------------------------------------------------------------------
    def create(
        self, kind: Kind, name: str | None, principal: str, *, allow_existing: bool = False
    ) -> dict[str, Any]:
        """A new object: ephemeral without ``name``; a name taken -> AlreadyExistsError, unless
        ``allow_existing`` (then the existing one)."""
        from sqlalchemy.exc import IntegrityError

        k = KINDS[kind]
        now = time.time()
        row = {
            "id": new_id(k.prefix),
            "name": name,
            "ephemeral": name is None,
            "created_at": now,
            "created_by": principal,
            "last_used_at": now,
        }
        try:
            with self.db.write() as conn:
                conn.execute(k.table.insert().values(**row))
            return row
        except IntegrityError:
            assert name is not None  # ids are random: only a name can collide
            if allow_existing:
                return self.lookup(kind, name, create_if_missing=False, principal=principal)
            raise exc.AlreadyExistsError(
                f"A {k.label} named {name!r} already exists. Use {k.label}.from_name({name!r}) to open it, "
                f"or {k.label}.objects.create({name!r}, allow_existing=True)."
            ) from None

    def lookup(self, kind: Kind, name: str, *, create_if_missing: bool, principal: str) -> dict[str, Any]:
        k = KINDS[kind]
        t = k.table
        with self.db.read() as conn:
            row = conn.execute(select(t).where(t.c.name == name)).first()
        if row is not None:
            return _object_row(row)
        if not create_if_missing:
            raise exc.NotFoundError(
                f"{k.label} {name!r} does not exist. Create it with {k.label}.from_name({name!r}, "
                f"create_if_missing=True), or `cloudmodal {kind} create {name}`."
            )
        return self.create(kind, name, principal, allow_existing=True)

    def info(self, kind: Kind, oid: str) -> dict[str, Any]:
        t = KINDS[kind].table
        with self.db.read() as conn:
            row = conn.execute(select(t).where(t.c.id == oid)).first()
        if row is None:
            raise _missing(kind, oid)
        return _object_row(row)

    def list_named(self, kind: Kind, limit: int, created_before: float | None) -> list[dict[str, Any]]:
        """Named objects, newest first."""
        t = KINDS[kind].table
        q = select(t).where(t.c.name.is_not(None))
        if created_before is not None:
            q = q.where(t.c.created_at < created_before)
        with self.db.read() as conn:
            rows = conn.execute(q.order_by(t.c.created_at.desc()).limit(limit)).all()
        return [_object_row(r) for r in rows]

    def delete(self, kind: Kind, oid: str) -> None:
        """Delete an object and everything in it (one transaction: all or nothing)."""
        with self.db.write() as conn:
            _delete_object(conn, kind, oid)
        self._touched.pop(oid, None)
        if kind == "queue":
            self.cp.hub.notify(f"queue:{oid}")

    def heartbeat(self, kind: Kind, oid: str) -> None:
        t = KINDS[kind].table
        with self.db.write() as conn:
            n = conn.execute(update(t).where(t.c.id == oid).values(last_used_at=time.time())).rowcount
        if not n:
            raise _missing(kind, oid)

    # -- dicts -------------------------------------------------------------------------------------------
    def dict_get(self, did: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent); refreshes the idle clock of entries read after a
        day without a write."""
        E = kv.dict_entries
        hashes = [key_hash(k) for k in keys]
        with self.db.read() as conn:
            self._exists(conn, "dict", did)
            wanted = sorted(set(hashes))
            marks = ", ".join("?" * len(wanted))
            rows = conn.exec_driver_sql(
                self._q(
                    "SELECT key_hash, value, updated_at FROM kv_dict_entry "
                    f"WHERE dict_id = ? AND key_hash IN ({marks})"
                ),
                (did, *wanted),
            ).all()
        now = time.time()
        found = {bytes(h): bytes(v) for h, v, _ in rows}
        stale = [h for h, _, at in rows if now - at > READ_TOUCH_S]
        if stale:
            with self.db.write() as conn:
                conn.execute(
                    update(E).where(E.c.dict_id == did, E.c.key_hash.in_(stale)).values(updated_at=now)
                )
        return [found.get(h) for h in hashes]

    def dict_put(
        self,
        did: str,
        entries: Sequence[tuple[bytes, bytes]],
        *,
        skip_if_exists: bool,
        request_id: str | None = None,
    ) -> int:
        """Store ``entries`` (a later duplicate key wins) in one transaction; with ``skip_if_exists``, only
        keys not present. Returns how many were written (with ``request_id``, recorded: a retry of a
        ``skip_if_exists`` put answers what the first attempt wrote, not 0)."""
        _check_dict_entries(entries)
        if not entries:
            return 0
        rows: dict[bytes, tuple[bytes, bytes]] = {}
        for k, v in entries:
            rows[key_hash(k)] = (k, v)  # a later duplicate wins, as in dict.update
        return self._dict_put(did, {h: rows[h] for h in sorted(rows)}, skip_if_exists, request_id)

    def _dict_put(
        self, did: str, rows: dict[bytes, tuple[bytes, bytes]], skip_if_exists: bool, rid: str | None
    ) -> int:
        """``rows`` (key hash -> key, value) in key-hash order. On PostgreSQL one round trip without a request
        id (the upsert is guarded and committed with the lock), two with one."""
        now = time.time()
        size = sum(len(k) + len(v) for k, v in rows.values())
        with self.db.write() as conn, self._tx(conn) as tx:
            lock = self._send_lock(tx, "dict", did, now)
            claim = kv_requests.send_claim(tx, did, rid, "dict.put", now)
            if tx.sqlite:  # each statement ran as it was sent: check, then write
                _locked(lock, "dict", did)
                done = kv_requests.recorded(tx, claim)
                if done is not None:
                    return int(done.answer)
                written = self._sqlite_put_entries(tx, did, rows, skip_if_exists, now)
            else:
                guard, guard_params = kv_requests.claim_guard(claim)
                keys, values = [k for k, _ in rows.values()], [v for _, v in rows.values()]
                sql = _PG_ENTRIES + guard + _PG_ON_CONFLICT[skip_if_exists]
                # RETURNING, not rowcount: what a driver reports for ON CONFLICT DO NOTHING varies
                counted = skip_if_exists and len(rows) == 1
                sent = tx.run(
                    sql + (" RETURNING key_hash" if counted else ""),
                    (did, now, list(rows), keys, values, did, *guard_params),
                    size=size,
                )
                if claim is None:
                    tx.commit()  # everything sent answers now: one round trip in all
                    _locked(lock, "dict", did)  # else the guard wrote nothing
                    return len(sent.fetchall()) if counted else len(rows)
                _locked(lock, "dict", did)  # else the guard wrote nothing
                done = kv_requests.recorded(tx, claim)
                if done is not None:
                    return int(done.answer)  # the guard wrote nothing
                written = len(sent.fetchall()) if counted else len(rows)
            kv_requests.record(tx, claim, written)
            tx.commit()
        return written

    @staticmethod
    def _sqlite_put_entries(
        tx: Tx, did: str, rows: dict[bytes, tuple[bytes, bytes]], skip_if_exists: bool, now: float
    ) -> int:
        sql = _UPSERT_ENTRIES if not skip_if_exists else _INSERT_NEW_ENTRIES
        if len(rows) == 1:
            ((h, (k, v)),) = rows.items()
            return len(tx.run(sql + " RETURNING key_hash", (did, h, k, v, now)).fetchall())
        tx.many(sql, [(did, h, k, v, now) for h, (k, v) in rows.items()])  # one prepared statement
        return len(rows)

    def dict_pop(self, did: str, key: bytes, request_id: str | None = None) -> bytes | None:
        """Remove ``key`` and answer its value (None when absent); with ``request_id``, a retry answers the
        value the first attempt removed."""
        rid, now = request_id, time.time()
        with self.db.write() as conn, self._tx(conn) as tx:
            lock = self._send_lock(tx, "dict", did, now)
            claim = kv_requests.send_claim(tx, did, rid, "dict.pop", now)
            # guarded (sent before the claim is read); the dict's entries exist only while the dict does
            guard, guard_params = kv_requests.claim_guard(claim)
            popped = tx.run(
                f"DELETE FROM kv_dict_entry WHERE dict_id = ? AND key_hash = ?{guard} RETURNING value",
                (did, key_hash(key), *guard_params),
            )
            _locked(lock, "dict", did)
            done = kv_requests.recorded(tx, claim)
            if done is not None:
                return bytes(done.answer)
            row = popped.fetchone()
            if row is None:
                return None  # nothing changed: nothing to record
            value = bytes(row[0])
            kv_requests.record(tx, claim, value)
            tx.commit()
        return value

    def dict_contains(self, did: str, key: bytes) -> bool:
        E = kv.dict_entries
        with self.db.read() as conn:
            self._exists(conn, "dict", did)
            return (
                conn.execute(
                    select(E.c.key_hash).where(E.c.dict_id == did, E.c.key_hash == key_hash(key))
                ).first()
                is not None
            )

    def dict_len(self, did: str) -> int:
        """The number of entries, counted up to DICT_LEN_CAP (Modal's cap: counting is a scan)."""
        E = kv.dict_entries
        with self.db.read() as conn:
            self._exists(conn, "dict", did)
            inner = select(E.c.key_hash).where(E.c.dict_id == did).limit(DICT_LEN_CAP).subquery()
            return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())

    def dict_clear(self, did: str) -> int:
        E = kv.dict_entries
        with self.db.write() as conn:
            self._lock_object(conn, "dict", did, time.time())
            return int(conn.execute(delete(E).where(E.c.dict_id == did)).rowcount)

    def dict_scan(
        self, did: str, after: str, limit: int, *, keys: bool, values: bool
    ) -> tuple[list[list[Any]], str | None]:
        """A page of entries in key-hash order after the hash ``after`` (hex): ``[key?, value?]`` rows, and the
        cursor of the next page (hex; None at the end)."""
        after_hash = bytes.fromhex(after)
        cols = ", ".join(["key_hash"] + (["key"] if keys else []) + (["value"] if values else []))
        with self.db.read() as conn:
            self._exists(conn, "dict", did)
            if not self.db.is_sqlite:
                # Walk the primary key in order. Without statistics on this dict's rows (a dict that grew since
                # the table was last analyzed) the planner may instead fetch every entry after the cursor and
                # sort them for each page: 20 times slower on a dict of 40,000, and quadratic over a walk.
                conn.exec_driver_sql("SET LOCAL enable_sort = off")
            result = conn.exec_driver_sql(
                self._q(
                    f"SELECT {cols} FROM kv_dict_entry WHERE dict_id = ? AND key_hash > ? "
                    "ORDER BY key_hash LIMIT ?"
                ),
                (did, after_hash, limit),
            )
            out: list[list[Any]] = []
            size = 0
            last = None
            full = False
            while not full and (chunk := result.fetchmany(256)):  # not row by row: a call per row costs more
                for row in chunk:
                    out.append([bytes(x) for x in row[1:]])
                    last = bytes(row[0]).hex()
                    size += sum(len(x) for x in row[1:])
                    if size >= PAGE_BYTES:
                        full = True
                        break
            result.close()
        more = full or len(out) == limit
        return out, (last if more else None)

    # -- queues ------------------------------------------------------------------------------------------
    def _send_partition(
        self, tx: Tx, qid: str, partition: str, now: float, *, create: bool
    ) -> tuple[Any, Any]:
        """Send the partition's lock (its row first, before its items: see the module's docstring), after
        making the row when ``create``; read them with :meth:`_partition`."""
        made = None
        if create:
            # RETURNING, not rowcount (which drivers report differently for ON CONFLICT DO NOTHING)
            made = tx.run(
                "INSERT INTO kv_queue_partition (queue_id, partition, expires_at, items, bytes) "
                "VALUES (?, ?, ?, 0, 0) ON CONFLICT (queue_id, partition) DO NOTHING RETURNING queue_id",
                (qid, partition, now),
            )
        lock = "" if self.db.is_sqlite else " FOR UPDATE"
        row = tx.run(
            "SELECT items, bytes, expires_at FROM kv_queue_partition WHERE queue_id = ? AND partition = ?"
            + lock,
            (qid, partition),
        )
        return made, row

    @staticmethod
    def _partition(
        tx: Tx, sent: tuple[Any, Any], qid: str, partition: str, now: float
    ) -> tuple[int, int, bool] | None:
        """The partition's (items, bytes, created now), None when it does not exist; an expired partition
        is emptied here."""
        made, row = sent
        created = made is not None and made.fetchone() is not None
        got = row.fetchone()
        if got is None:
            return None
        items, size, expires_at = got
        if items and expires_at < now:
            tx.run("DELETE FROM kv_queue_item WHERE queue_id = ? AND partition = ?", (qid, partition))
            tx.run(
                "UPDATE kv_queue_partition SET items = 0, bytes = 0 WHERE queue_id = ? AND partition = ?",
                (qid, partition),
            )
            items = size = 0
        return int(items), int(size), created

    def queue_put(
        self, qid: str, partition: str, values: Sequence[bytes], ttl_s: float, request_id: str | None = None
    ) -> None:
        """Append ``values`` to the partition in one transaction, all or none. Raises :class:`QueueFull`
        when they do not fit now (the caller may wait for space), and a clear error for what can never fit.
        With ``request_id``, a retry of a put that was stored stores nothing more."""
        _check_put(values, ttl_s)
        if not values:
            return
        rid, now = request_id, time.time()
        n, size = len(values), sum(map(len, values))
        with self.db.write() as conn, self._tx(conn) as tx:
            lock = self._send_lock(tx, "queue", qid, now)
            claim = kv_requests.send_claim(tx, qid, rid, "queue.put", now)
            part = self._send_partition(tx, qid, partition, now, create=True)
            _locked(lock, "queue", qid)
            if kv_requests.recorded(tx, claim) is not None:
                tx.rollback()  # the partition's row this attempt may have made
                return
            got = self._partition(tx, part, qid, partition, now)
            assert got is not None
            items, used, created = got
            if created:
                count = tx.run(
                    "SELECT count(*) FROM kv_queue_partition WHERE queue_id = ?", (qid,)
                ).fetchone()[0]
                if count > MAX_PARTITIONS:
                    raise exc.ResourceExhaustedError(
                        f"The queue has {MAX_PARTITIONS:,} partitions, the most a queue may have: partition "
                        f"{partition!r} was not created and nothing was stored. Clear partitions you no "
                        "longer use (queue.clear(partition=...)), or give them a shorter partition_ttl."
                    )
            if items + n > MAX_PARTITION_ITEMS:
                raise QueueFull(
                    f"Partition {_part(partition)} holds {items:,} items; {n:,} more would exceed its limit of "
                    f"{MAX_PARTITION_ITEMS:,} items. Nothing was stored. Consume items (get/get_many), clear "
                    "the partition, or spread values over more partitions."
                )
            if used + size > MAX_PARTITION_BYTES:
                raise QueueFull(
                    f"Partition {_part(partition)} holds {used:,} bytes; {size:,} more would exceed its limit "
                    f"of {MAX_PARTITION_BYTES:,} bytes (64 MiB). Nothing was stored. Consume items, clear the "
                    "partition, or spread values over more partitions."
                )
            if self.db.is_sqlite:
                tx.many(_INSERT_ITEMS, [(qid, partition, v, now) for v in values])
            else:  # one statement over an array, its rows numbered in order (ids keep the put's order)
                tx.run(_PG_INSERT_ITEMS, (qid, partition, now, list(values)), size=size)
            tx.run(
                "UPDATE kv_queue_partition SET items = ?, bytes = ?, expires_at = ? "
                "WHERE queue_id = ? AND partition = ?",
                (items + n, used + size, now + ttl_s, qid, partition),
            )
            kv_requests.record(tx, claim, None)
            tx.commit()
        self.cp.hub.notify(f"queue:{qid}:{partition}")

    def queue_get(self, qid: str, partition: str, n: int, request_id: str | None = None) -> list[bytes]:
        """Take up to ``n`` values from the front of the partition (each to exactly one getter). With
        ``request_id``, a retry of a get that took values answers those values and takes no more."""
        rid, now = request_id, time.time()
        with self.db.write() as conn, self._tx(conn) as tx:
            # one round trip to take the items (guarded: see _TAKE_PG), one to record and commit
            lock = self._send_lock(tx, "queue", qid, now)
            claim = kv_requests.send_claim(tx, qid, rid, "queue.get", now)
            part = self._send_partition(tx, qid, partition, now, create=False)
            guard, guard_params = kv_requests.claim_guard(claim)
            take, params = (
                (_TAKE_SQLITE, (qid, partition, n))
                if tx.sqlite
                else (_TAKE_PG, (qid, partition, n, qid, partition))
            )
            taken = tx.run(
                take + _TAKE_ALIVE + guard + " RETURNING id, value",
                (*params, qid, partition, now, *guard_params),
            )
            _locked(lock, "queue", qid)
            done = kv_requests.recorded(tx, claim)
            if done is not None:
                return [bytes(v) for v in done.answer]
            got = self._partition(tx, part, qid, partition, now)
            rows = taken.fetchall()
            if got is None or not rows:
                return []
            rows.sort(key=lambda r: r[0])
            values = [bytes(r[1]) for r in rows]
            tx.run(
                "UPDATE kv_queue_partition SET items = items - ?, bytes = bytes - ? "
                "WHERE queue_id = ? AND partition = ?",
                (len(rows), sum(map(len, values)), qid, partition),
            )
            kv_requests.record(tx, claim, values)
            tx.commit()
        self.cp.hub.notify(f"queue-space:{qid}:{partition}")
        return values

    def queue_len(self, qid: str, partition: str, total: bool) -> int:
        P = kv.queue_partitions
        now = time.time()
        with self.db.read() as conn:
            self._exists(conn, "queue", qid)
            q = select(func.coalesce(func.sum(P_ITEMS), 0)).where(P.c.queue_id == qid, P.c.expires_at >= now)
            if not total:
                q = q.where(P.c.partition == partition)
            return int(conn.execute(q).scalar_one())

    def queue_clear(self, qid: str, partition: str, all: bool) -> int:  # noqa: A002 - Modal's name
        P, I = kv.queue_partitions, kv.queue_items  # noqa: E741
        with self.db.write() as conn:
            self._lock_object(conn, "queue", qid, time.time())
            if all:
                parts = conn.execute(select(P.c.partition).where(P.c.queue_id == qid).with_for_update()).all()
                removed = conn.execute(delete(I).where(I.c.queue_id == qid)).rowcount
                conn.execute(delete(P).where(P.c.queue_id == qid))
                names = [p for (p,) in parts]
            else:
                conn.execute(
                    select(P_ITEMS).where(P.c.queue_id == qid, P.c.partition == partition).with_for_update()
                ).first()
                removed = conn.execute(
                    delete(I).where(I.c.queue_id == qid, I.c.partition == partition)
                ).rowcount
                conn.execute(delete(P).where(P.c.queue_id == qid, P.c.partition == partition))
                names = [partition]
        self.cp.hub.notify(*(f"queue-space:{qid}:{p}" for p in names))
        return int(removed)

    def queue_peek(self, qid: str, partition: str, after: int, limit: int) -> list[list[Any]]:
        """``[id, value]`` of the partition's items after ``after``, oldest first, without taking them."""
        P, I = kv.queue_partitions, kv.queue_items  # noqa: E741
        now = time.time()
        with self.db.read() as conn:
            self._exists(conn, "queue", qid)
            alive = conn.execute(
                select(P.c.expires_at).where(P.c.queue_id == qid, P.c.partition == partition)
            ).scalar()
            if alive is None or alive < now:
                return []
            result = conn.execute(
                select(I.c.id, I.c.value)
                .where(I.c.queue_id == qid, I.c.partition == partition, I.c.id > after)
                .order_by(I.c.id)
                .limit(limit)
            )
            out: list[list[Any]] = []
            size = 0
            for i, v in result:
                out.append([i, v])
                size += len(v)
                if size >= PAGE_BYTES:
                    break
            result.close()
        return out


# -- checks -------------------------------------------------------------------------------------------------
def _part(partition: str) -> str:
    return "(default)" if partition == "" else repr(partition)


def _check_dict_entries(entries: Iterable[tuple[bytes, bytes]]) -> None:
    total = 0
    for k, v in entries:
        if len(k) > MAX_DICT_KEY:
            raise exc.RequestSizeError(
                f"A dict key pickles to {len(k):,} bytes, over the limit of {MAX_DICT_KEY:,}. Use a shorter "
                "key (a string or a hash of the object). Nothing was stored."
            )
        if len(v) > MAX_DICT_VALUE:
            raise exc.RequestSizeError(
                f"A dict value pickles to {len(v):,} bytes, over the limit of {MAX_DICT_VALUE:,} (8 MiB). "
                "Store large data in a Volume and put its path in the dict. Nothing was stored."
            )
        total += len(k) + len(v)
    if total > MAX_DICT_REQUEST:
        raise exc.RequestSizeError(
            f"An update of {total:,} bytes is over the limit of {MAX_DICT_REQUEST:,} bytes per request. "
            "Split it into several smaller updates. Nothing was stored."
        )


def _check_put(values: Sequence[bytes], ttl_s: float) -> None:
    """What no amount of waiting makes fit: refused at once, with the limit and the fix."""
    for v in values:
        if len(v) > MAX_QUEUE_ITEM:
            raise exc.RequestSizeError(
                f"A queue item pickles to {len(v):,} bytes, over the limit of {MAX_QUEUE_ITEM:,} (1 MiB). "
                "Store large data in a Volume or a Dict and put a reference in the queue. Nothing was stored."
            )
    if len(values) > MAX_PARTITION_ITEMS:
        raise exc.InvalidError(
            f"put_many of {len(values):,} values: a partition holds at most {MAX_PARTITION_ITEMS:,} items. "
            "Put them in smaller batches as consumers take them, or over several partitions. Nothing was stored."
        )
    if sum(len(v) for v in values) > MAX_PARTITION_BYTES:
        raise exc.RequestSizeError(
            f"put_many of {sum(len(v) for v in values):,} bytes: a partition holds at most "
            f"{MAX_PARTITION_BYTES:,} bytes (64 MiB). Put smaller batches. Nothing was stored."
        )
    if not 0 < ttl_s <= MAX_TTL_S:
        raise exc.InvalidError(
            f"partition_ttl must be more than 0 and at most {MAX_TTL_S:,.0f} seconds (24 h), not {ttl_s!r}."
        )


def _locked(sent: Any, kind: Kind, oid: str) -> None:
    """The object of :meth:`KV._send_lock` exists (else NotFoundError)."""
    if sent.fetchone() is None:
        raise _missing(kind, oid)


def _missing(kind: Kind, oid: str) -> exc.NotFoundError:
    label = KINDS[kind].label
    return exc.NotFoundError(
        f"{label} {oid} does not exist: it was deleted, or it was ephemeral and its client stopped "
        f"(ephemeral objects are deleted {EPHEMERAL_IDLE_S / 60:.0f} minutes after their last heartbeat). "
        f"Open it again with {label}.from_name(name, create_if_missing=True)."
    )


def _delete_object(conn: Connection, kind: Kind, oid: str) -> None:
    t = KINDS[kind].table
    # the object's row first: its exclusive lock waits out writes in progress and keeps new ones out
    if not conn.execute(delete(t).where(t.c.id == oid)).rowcount:
        raise _missing(kind, oid)
    conn.execute(delete(kv.requests).where(kv.requests.c.object_id == oid))
    if kind == "dict":
        conn.execute(delete(kv.dict_entries).where(kv.dict_entries.c.dict_id == oid))
    else:
        P, I = kv.queue_partitions, kv.queue_items  # noqa: E741
        conn.execute(select(P.c.partition).where(P.c.queue_id == oid).with_for_update()).all()
        conn.execute(delete(I).where(I.c.queue_id == oid))
        conn.execute(delete(P).where(P.c.queue_id == oid))


# -- retention ----------------------------------------------------------------------------------------------
def prune(cp: ControlPlane, now: float | None = None) -> int:
    """One pass of the dicts' and queues' retention; returns the rows deleted. Deletes ephemeral objects
    whose client stopped heartbeating over EPHEMERAL_IDLE_S ago (with their contents), queue partitions past
    their TTL (with their items), and dict entries idle for DICT_IDLE_S (looked for at most every
    DICT_PRUNE_EVERY_S). Each in short transactions."""
    now = time.time() if now is None else now
    removed = 0
    kinds: tuple[Kind, ...] = ("dict", "queue")
    for kind in kinds:
        t = KINDS[kind].table
        with cp.db.read() as conn:
            stale = conn.execute(
                select(t.c.id)
                .where(t.c.ephemeral.is_(True), t.c.last_used_at < now - EPHEMERAL_IDLE_S)
                .limit(PRUNE_BATCH)
            ).all()
        for (oid,) in stale:
            with cp.db.write() as conn:
                removed += _delete_idle(conn, kind, oid, now)
    P, I = kv.queue_partitions, kv.queue_items  # noqa: E741
    with cp.db.read() as conn:
        parts = conn.execute(
            select(P.c.queue_id, P.c.partition).where(P.c.expires_at < now).limit(PRUNE_BATCH)
        ).all()
    for qid, partition in parts:

        def drop(conn: Connection, qid: str = qid, partition: str = partition) -> int:
            # the partition's row first (the lock order), and only while it is still expired: a put since
            # gave it a new expiry and new items
            where = and_(P.c.queue_id == qid, P.c.partition == partition)
            if not conn.execute(delete(P).where(where, P.c.expires_at < now)).rowcount:
                return 0
            return 1 + int(
                conn.execute(delete(I).where(I.c.queue_id == qid, I.c.partition == partition)).rowcount
            )

        removed += _prune_write(cp, drop)
    removed += _prune_idle_entries(cp, now)
    removed += kv_requests.prune(cp, now)
    if removed:
        log.info("retention: pruned %d rows of dicts and queues", removed)
    return removed


def _prune_idle_entries(cp: ControlPlane, now: float) -> int:
    """Dict entries idle for DICT_IDLE_S, at most every DICT_PRUNE_EVERY_S."""
    if 0 <= now - _dict_prunes.get(cp, float("-inf")) < DICT_PRUNE_EVERY_S:
        return 0
    _dict_prunes[cp] = now
    E = kv.dict_entries
    removed = 0
    while True:
        with cp.db.read() as conn:
            idle = conn.execute(
                select(E.c.dict_id, E.c.key_hash).where(E.c.updated_at < now - DICT_IDLE_S).limit(PRUNE_BATCH)
            ).all()
        if not idle:
            break
        by_dict: dict[str, list[str]] = {}
        for did, h in idle:
            by_dict.setdefault(did, []).append(h)

        def drop_entries(conn: Connection, by_dict: dict[str, list[str]] = by_dict) -> int:
            n = 0
            for did, hashes in by_dict.items():
                n += conn.execute(
                    delete(E).where(
                        E.c.dict_id == did, E.c.key_hash.in_(hashes), E.c.updated_at < now - DICT_IDLE_S
                    )
                ).rowcount
            return n

        got = _prune_write(cp, drop_entries)
        removed += got
        if got == 0 or len(idle) < PRUNE_BATCH:
            break
    return removed


def _delete_idle(conn: Connection, kind: Kind, oid: str, now: float) -> int:
    """Delete an ephemeral object still idle (a heartbeat since keeps it)."""
    t = KINDS[kind].table
    row = conn.execute(select(t.c.last_used_at).where(t.c.id == oid).with_for_update()).first()
    if row is None or row[0] >= now - EPHEMERAL_IDLE_S:
        return 0
    _delete_object(conn, kind, oid)
    return 1


def _prune_write(cp: ControlPlane, fn: Callable[[Connection], int]) -> int:
    with cp.db.write() as conn:
        return int(fn(conn))


__all__ = ["EPHEMERAL_IDLE_S", "KV", "KINDS", "REQUEST_KEEP_S", "QueueFull", "key_hash", "prune"]
