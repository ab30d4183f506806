"""Control-plane tables, declared with SQLAlchemy Core; every query (hot path or not) is Core on these.

The tables were SQLModel classes until every use turned out to be ``Model.__table__``: SQLModel (and the ORM it
pulls in) cost a control plane ~100 ms of imports on each start, a sixth of a cold ``cloudmodal run``, for a
declaration syntax. The columns, types, nullability, defaults and index names are the ones SQLModel derived
(``tests/server/test_models.py`` pins the DDL), so databases created before the change are used as they are (tables added since, like ``pool``, are
created on start).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    text,
)

metadata = MetaData()

_UNSET: Any = object()


def _c(name: str, kind: Any, default: Any = _UNSET, *, null: bool = False, **kw: Any) -> Column[Any]:
    """A column as SQLModel derived it from a field: NOT NULL unless the field was optional, the field's
    default as the column's (Python-side) default."""
    if default is not _UNSET:
        kw["default"] = default
    return Column(name, kind, nullable=null, **kw)


def _pk_int() -> Column[Any]:
    return Column("id", Integer, primary_key=True)


def _pk_str() -> Column[Any]:
    return Column("id", String, primary_key=True)


tokens = Table(
    "token",
    metadata,
    _pk_str(),
    _c("name", String, ""),
    _c("token_hash", String, index=True, unique=True),  # sha256 hex; the token itself is never stored
    _c("scope", String, "admin"),  # "admin" or "worker:<worker id>"
    _c("created_at", Float, 0.0),
    _c("revoked", Boolean, False),
)

apps = Table(
    "app",
    metadata,
    _pk_str(),
    _c("name", String, index=True),
    _c("state", String, "running"),  # running | deployed | stopped
    _c("ephemeral", Boolean, True),
    _c("created_at", Float, 0.0),
    _c("stopped_at", Float, None, null=True),
    _c("client_heartbeat_at", Float, None, null=True),
    _c("version", Integer, 1),
    _c("description", String, ""),
)

deployments = Table(
    "deployment",
    metadata,
    _pk_int(),
    _c("app_id", String, index=True),
    _c("version", Integer, 1),
    _c("created_at", Float, 0.0),
    Column("functions", JSON),
)

functions = Table(
    "function",
    metadata,
    _pk_str(),
    _c("app_id", String, index=True),
    _c("name", String),  # "f", "Cls", or "Cls(params-hash)" for a parameterized class instance
    _c("parent_id", String, None, null=True),  # class function a parameterized instance belongs to
    Column("spec", JSON),
    _c("module", String, ""),
    _c("source_name", String, None, null=True),  # file name of the shipped source
    _c("source_blob", String, None, null=True),
    _c("source_dir", String, None, null=True),  # where the source lives on the client's host (local provider)
    _c("pickled_blob", String, None, null=True),  # serialized=True functions, parameters of class instances
    Column("inline_env", JSON),
    _c("definition_hash", String, ""),
    _c("version", Integer, 1),
    _c("created_at", Float, 0.0),
    _c("last_active_at", Float, 0.0),
    _c("state", String, "active"),  # active | stopped
)

calls = Table(
    "call",
    metadata,
    _pk_str(),
    _c("function_id", String, index=True),
    _c("app_id", String, index=True),
    _c("kind", String, "remote"),  # remote | map | spawn | spawn_map | schedule
    _c("created_at", Float, 0.0),
    _c("num_inputs", Integer, 0),
    _c("cancelled", Boolean, False),
    # who made the call: a token id, or "worker:<id>" for a nested call (only they, and the team-wide
    # identities, read its outputs); NULL for calls made before calls had owners
    _c("created_by", String, None, null=True),
)

inputs = Table(
    "input",
    metadata,
    _pk_int(),
    _c("call_id", String),
    _c("function_id", String),
    _c("idx", Integer),
    _c("method", String, None, null=True),
    Column("args", LargeBinary),
    _c("args_blob", String, None, null=True),
    _c("state", Integer, 0),  # 0 pending, 1 claimed, 2 done
    _c("attempts", Integer, 0),  # retries consumed by user exceptions and timeouts
    _c("crashes", Integer, 0),  # worker deaths while running it (never counted against Retries)
    _c("worker_id", String, None, null=True),
    _c("lease_expires", Float, 0.0),
    _c("available_at", Float, 0.0),
    _c("created_at", Float, 0.0),
    UniqueConstraint("call_id", "idx"),
    # Partial indexes: only unfinished inputs are ever looked up by state, and finished ones pile up.
    Index("ix_input_pending", "function_id", "id", sqlite_where=text("state = 0")),
    Index("ix_input_open", "function_id", "state", sqlite_where=text("state < 2")),
    Index("ix_input_call", "call_id", "state"),
    Index("ix_input_worker", "worker_id", "state"),
)

outputs = Table(
    "output",
    metadata,
    _pk_int(),
    _c("input_id", Integer),
    _c("call_id", String),
    _c("idx", Integer),
    _c("gen_index", Integer, -1),  # -1: the input's final output; 0..n: generator items
    _c("status", String, "success"),  # success | failure | timeout | crashed | cancelled | gen_item
    Column("data", LargeBinary),
    _c("data_blob", String, None, null=True),
    _c("created_at", Float, 0.0),
    UniqueConstraint("input_id", "gen_index"),
    Index("ix_output_call", "call_id", "id"),
)

workers = Table(
    "worker",
    metadata,
    _pk_str(),
    _c("app_id", String, index=True),
    _c("function_id", String, index=True),
    _c("provider", String, "local"),
    _c("instance_id", String, ""),
    _c("state", String, "starting"),  # starting | ready | draining | stopped
    _c("function_version", Integer, 1),
    _c("started_at", Float, 0.0),
    _c("ready_at", Float, None, null=True),
    _c("last_heartbeat", Float, 0.0),
    _c("idle_since", Float, None, null=True),
    _c("in_flight", Integer, 0),
    _c("stopped_at", Float, None, null=True),
    _c("stop_reason", String, None, null=True),
    Column("offer", JSON),
    _c("market", String, "on-demand"),
    _c("price_per_hour", Float, 0.0),
    _c("gpu", String, None, null=True),
    _c("host", String, ""),
    _c("pid", Integer, None, null=True),
)

pools = Table(
    "pool",
    metadata,
    Column("function_id", String, primary_key=True),  # a function's workers are its pool
    _c("app_id", String, index=True),
    _c("desired", Integer, 0),  # the autoscaler's last decision
    _c("workers", Integer, 0),  # live workers at that decision
    _c("reason", String, ""),
    _c("fallen_back", Boolean, False),  # on on-demand because spot kept failing (see market_state)
    Column("market_state", JSON),  # spot.PoolMarketState.to_wire(): kept across restarts and take-overs
    _c("updated_at", Float, 0.0),
)

events = Table(
    "event",
    metadata,
    _pk_int(),
    _c("app_id", String, None, null=True),
    _c("function_id", String, None, null=True),
    _c("ts", Float, 0.0),
    _c("kind", String, ""),
    _c("message", String, ""),
    Column("data", JSON),
    Index("ix_event_app", "app_id", "id"),
)

logs = Table(
    "log",
    metadata,
    _pk_int(),
    _c("app_id", String, ""),
    _c("function_id", String, None, null=True),
    _c("worker_id", String, None, null=True),
    _c("call_id", String, None, null=True),
    _c("stream", String, "stdout"),
    _c("ts", Float, 0.0),
    _c("text", String, ""),
    Index("ix_log_app", "app_id", "id"),
)


def use_postgresql_partial_indexes() -> None:
    """Give the partial indexes their PostgreSQL ``WHERE`` too. Declared only when PostgreSQL is used:
    naming a ``postgresql_`` option imports that dialect, which an SQLite control plane (the embedded
    default) would pay on every cold start."""
    for index in inputs.indexes:
        where = index.dialect_options["sqlite"]["where"]
        if where is not None:
            index.dialect_kwargs["postgresql_where"] = where


def add_missing_columns(conn: Any) -> list[str]:
    """Add the nullable columns a database created by an earlier version lacks (``create_all`` creates missing
    tables only). Returns ``table.column`` for each column added.

    The schema has grown by nullable columns only so far; a change of type or constraint needs a real
    migration tool, which this is not."""
    from sqlalchemy import inspect

    insp = inspect(conn)
    added = []
    for table in metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise RuntimeError(
                    f"The database lacks column {table.name}.{col.name}, which cannot be added in place: "
                    "migrate it, or start with a new database."
                )
            kind = col.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {kind}'))
            added.append(f"{table.name}.{col.name}")
    return added
