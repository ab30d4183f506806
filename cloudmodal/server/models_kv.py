"""Tables of Dicts and Queues (``cloudmodal.Dict``, ``cloudmodal.Queue``).

Imported by :mod:`cloudmodal.server.models` (so one ``metadata`` holds every table); created by their migration.

Keys and values are opaque bytes to the control plane (the client pickles them; the server never unpickles).
A dict entry is keyed by the sha256 of its pickled key, so the primary key has a fixed size whatever the key.
A queue's items are rows in insertion order (their autoincrement id), and each partition has a row of its own
that counts its items and bytes: written in the transaction of every put and get, so the limits are checked
without counting rows, and on PostgreSQL locked first by every writer of the partition (one lock order, no
deadlocks).

Two indexes differ on PostgreSQL, where each write's index work is a large part of a batch's cost (the DDL
hooks at the end of this module; declared without ``postgresql_`` options, which would import that dialect on
every SQLite control plane's start):

- a dict entry's ``updated_at`` (read only by the idle-entry pruner) has a BRIN index there: a few pages for the
  whole table, next to nothing per write, where a btree is a second tree to update on every upsert. A BRIN
  range keeps the oldest time it ever held, so once entries were pruned or rewritten the pruner's look-up
  reads most of the table: it runs hourly (``svc_kv.DICT_PRUNE_EVERY_S``), not on every retention pass;
- a queue item's key there is its unique index ``(queue_id, partition, id)`` alone, which every query walks
  (``id`` comes from a sequence, unique by itself): no second tree over ``id``. SQLite keeps ``id`` as its
  primary key (the rowid, which numbers the items) beside the same unique index.
"""

# No ``from __future__ import annotations``: see models.py (SQLModel evaluates the annotations).
from typing import Any

from sqlalchemy import DDL, Column, Index, LargeBinary, PrimaryKeyConstraint, Table, event
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex
from sqlmodel import Field

from cloudmodal.server.models import Row


class DictObject(Row, table=True):
    """A Dict: named (``Dict.from_name``) or ephemeral (``Dict.ephemeral``, deleted when its client goes)."""

    __tablename__ = "kv_dict"

    id: str = Field(primary_key=True)  # "di-..."
    name: str | None = Field(default=None, unique=True)  # NULL for an ephemeral dict
    ephemeral: bool = False
    created_at: float = 0.0
    created_by: str = ""  # the token id, or "worker:<id>"
    last_used_at: float = 0.0  # heartbeats of an ephemeral dict; writes (at most once a minute) of any


class DictEntry(Row, table=True):
    """One key of a dict. ``updated_at``: last written, or read (refreshed at most once a day): an entry idle
    for 7 days is pruned, as Modal's are."""

    __tablename__ = "kv_dict_entry"
    __table_args__ = (Index("ix_kv_dict_entry_updated", "updated_at", info={"postgresql_using": "brin"}),)

    dict_id: str = Field(primary_key=True)
    # sha256 of ``key``, its 32 raw bytes: compared byte for byte, never in the locale's collation (a 500-row
    # upsert on PostgreSQL spent a quarter of its time comparing 64 hex characters that way)
    key_hash: bytes = Field(sa_column=Column("key_hash", LargeBinary, primary_key=True, nullable=False))
    key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    updated_at: float = 0.0


class QueueObject(Row, table=True):
    """A Queue: named or ephemeral, as a dict."""

    __tablename__ = "kv_queue"

    id: str = Field(primary_key=True)  # "qu-..."
    name: str | None = Field(default=None, unique=True)
    ephemeral: bool = False
    created_at: float = 0.0
    created_by: str = ""
    last_used_at: float = 0.0


class QueueItem(Row, table=True):
    """One value in a queue's partition; ``id`` orders them (FIFO per partition)."""

    __tablename__ = "kv_queue_item"
    __table_args__ = (
        Index("ix_kv_queue_item_order", "queue_id", "partition", "id", unique=True),
        # on PostgreSQL the unique index above is the key instead (see the module's docstring)
        PrimaryKeyConstraint("id", info={"postgresql_key_index": "ix_kv_queue_item_order"}),
    )

    id: int | None = Field(default=None, primary_key=True)
    queue_id: str
    partition: str = ""  # "" is the default partition
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: float = 0.0


class QueuePartition(Row, table=True):
    """A partition's counters, kept in the transaction of each put and get; ``expires_at``: its last put plus
    its ``partition_ttl`` (then its items are gone)."""

    __tablename__ = "kv_queue_partition"
    __table_args__ = (Index("ix_kv_queue_partition_expires", "expires_at"),)

    queue_id: str = Field(primary_key=True)
    partition: str = Field(primary_key=True)
    expires_at: float = 0.0
    items: int = 0
    bytes: int = 0


class KVRequest(Row, table=True):
    """The answer of a non-idempotent Dict/Queue request (queue put/get, dict pop, put with skip_if_exists),
    recorded in the transaction that made it under the client's request id: a request sent again after its
    answer was lost (the connection broke, the control plane restarted) gets this answer back instead of
    running twice. Kept ``svc_kv.REQUEST_KEEP_S`` (10 minutes), longer than a client retries one request."""

    __tablename__ = "kv_request"
    __table_args__ = (Index("ix_kv_request_created", "created_at"),)

    object_id: str = Field(primary_key=True)  # the dict or queue ("di-..."/"qu-...")
    request_id: str = Field(primary_key=True)  # made by the client, the same on every retry
    op: str = ""  # "queue.put", "queue.get", "dict.pop", "dict.put": one id is never reused for another op
    result: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # msgpack of the answer
    created_at: float = 0.0


# -- PostgreSQL's forms of the indexes above ----------------------------------------------------------------
@compiles(CreateIndex, "postgresql")
def _pg_create_index(create: CreateIndex, compiler: Any, **kw: Any) -> str:
    """An index's ``info["postgresql_using"]`` (its access method there), applied as the dialect's option."""
    index = create.element
    using = index.info.get("postgresql_using")
    if using is not None:
        index.dialect_kwargs["postgresql_using"] = using  # the dialect is loaded by now
    text: str = compiler.visit_create_index(create, **kw)
    return text


@compiles(PrimaryKeyConstraint, "postgresql")
def _pg_primary_key(constraint: PrimaryKeyConstraint, compiler: Any, **kw: Any) -> str | None:
    """A primary key whose ``info["postgresql_key_index"]`` names a unique index is not created there (the
    index is the key); None leaves it out of CREATE TABLE."""
    if constraint.info.get("postgresql_key_index"):
        return None
    text: str = compiler.visit_primary_key_constraint(constraint, **kw)
    return text


def _replica_identity(table: Table) -> None:
    """A table keyed by a unique index on PostgreSQL is identified by it for logical replication (a table
    without a primary key or a replica identity refuses UPDATE and DELETE once it is published)."""
    index = table.primary_key.info.get("postgresql_key_index")
    if index:
        ddl = DDL(f"ALTER TABLE {table.name} REPLICA IDENTITY USING INDEX {index}")
        event.listen(table, "after_create", ddl.execute_if(dialect="postgresql"))


def _table(model: type[Row]) -> Table:
    table: Table = model.__table__  # type: ignore[attr-defined]  # set by SQLAlchemy's mapping
    return table


dicts = _table(DictObject)
dict_entries = _table(DictEntry)
queues = _table(QueueObject)
queue_items = _table(QueueItem)
_replica_identity(queue_items)
queue_partitions = _table(QueuePartition)
requests = _table(KVRequest)
