"""The schema of release 0.1.0, the first with migrations.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

A database this creates is the one 0.1.0 created without migrations: :func:`schema` is that schema, frozen
here (later revisions change it by operations of their own, never by editing this one). A database made
before migrations existed has no version row: ``migrations.upgrade`` recognises it with :func:`adopt` and
stamps it at this revision.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _col(name: str, kind: Any, default: Any = None, *, null: bool = False, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, kind, nullable=null, default=default, **kw)


def schema(dialect: str) -> sa.MetaData:
    """The tables, indexes and constraints of release 0.1.0 (``dialect``: ``sqlite`` or ``postgresql``, for
    the partial indexes' ``WHERE``). Column defaults are Python-side only, as the models declare them."""
    m = sa.MetaData()
    S, I, F, B = sa.String, sa.Integer, sa.Float, sa.Boolean  # noqa: E741, N806

    def where(clause: str) -> dict[str, Any]:
        return {f"{dialect}_where": sa.text(clause)}

    sa.Table(
        "token",
        m,
        sa.Column("id", S, primary_key=True),
        _col("name", S, ""),
        _col("token_hash", S, index=True, unique=True),
        _col("scope", S, "admin"),
        _col("created_at", F, 0.0),
        _col("revoked", B, False),
    )
    sa.Table(
        "app",
        m,
        sa.Column("id", S, primary_key=True),
        _col("name", S, index=True),
        _col("state", S, "running"),
        _col("ephemeral", B, True),
        _col("created_at", F, 0.0),
        _col("stopped_at", F, null=True),
        _col("client_heartbeat_at", F, null=True),
        _col("version", I, 1),
        _col("description", S, ""),
    )
    sa.Table(
        "deployment",
        m,
        sa.Column("id", I, primary_key=True),
        _col("app_id", S, index=True),
        _col("version", I, 1),
        _col("created_at", F, 0.0),
        sa.Column("functions", sa.JSON),
    )
    sa.Table(
        "function",
        m,
        sa.Column("id", S, primary_key=True),
        _col("app_id", S, index=True),
        _col("name", S),
        _col("parent_id", S, null=True),
        sa.Column("spec", sa.JSON),
        _col("module", S, ""),
        _col("source_name", S, null=True),
        _col("source_blob", S, null=True),
        _col("source_dir", S, null=True),
        _col("pickled_blob", S, null=True),
        sa.Column("inline_env", sa.JSON),
        _col("definition_hash", S, ""),
        _col("version", I, 1),
        _col("created_at", F, 0.0),
        _col("last_active_at", F, 0.0),
        _col("state", S, "active"),
    )
    sa.Table(
        "call",
        m,
        sa.Column("id", S, primary_key=True),
        _col("function_id", S, index=True),
        _col("app_id", S, index=True),
        _col("kind", S, "remote"),
        _col("created_at", F, 0.0),
        _col("num_inputs", I, 0),
        _col("cancelled", B, False),
        _col("created_by", S, null=True),
    )
    sa.Table(
        "input",
        m,
        sa.Column("id", I, primary_key=True),
        _col("call_id", S),
        _col("function_id", S),
        _col("idx", I),
        _col("method", S, null=True),
        sa.Column("args", sa.LargeBinary),
        _col("args_blob", S, null=True),
        _col("state", I, 0),
        _col("attempts", I, 0),
        _col("crashes", I, 0),
        _col("worker_id", S, null=True),
        _col("lease_expires", F, 0.0),
        _col("available_at", F, 0.0),
        _col("created_at", F, 0.0),
        sa.UniqueConstraint("call_id", "idx"),
        sa.Index("ix_input_pending", "function_id", "id", **where("state = 0")),
        sa.Index("ix_input_open", "function_id", "state", **where("state < 2")),
        sa.Index("ix_input_call", "call_id", "state"),
        sa.Index("ix_input_worker", "worker_id", "state"),
    )
    sa.Table(
        "output",
        m,
        sa.Column("id", I, primary_key=True),
        _col("input_id", I),
        _col("call_id", S),
        _col("idx", I),
        _col("gen_index", I, -1),
        _col("status", S, "success"),
        sa.Column("data", sa.LargeBinary),
        _col("data_blob", S, null=True),
        _col("created_at", F, 0.0),
        sa.UniqueConstraint("input_id", "gen_index"),
        sa.Index("ix_output_call", "call_id", "id"),
    )
    sa.Table(
        "worker",
        m,
        sa.Column("id", S, primary_key=True),
        _col("app_id", S, index=True),
        _col("function_id", S, index=True),
        _col("provider", S, "local"),
        _col("instance_id", S, ""),
        _col("state", S, "starting"),
        _col("function_version", I, 1),
        _col("started_at", F, 0.0),
        _col("ready_at", F, null=True),
        _col("last_heartbeat", F, 0.0),
        _col("idle_since", F, null=True),
        _col("in_flight", I, 0),
        _col("stopped_at", F, null=True),
        _col("stop_reason", S, null=True),
        sa.Column("offer", sa.JSON),
        _col("market", S, "on-demand"),
        _col("price_per_hour", F, 0.0),
        _col("gpu", S, null=True),
        _col("host", S, ""),
        _col("pid", I, null=True),
    )
    sa.Table(
        "pool",
        m,
        sa.Column("function_id", S, primary_key=True),
        _col("app_id", S, index=True),
        _col("desired", I, 0),
        _col("workers", I, 0),
        _col("reason", S, ""),
        _col("fallen_back", B, False),
        sa.Column("market_state", sa.JSON),
        _col("updated_at", F, 0.0),
    )
    sa.Table(
        "event",
        m,
        sa.Column("id", I, primary_key=True),
        _col("app_id", S, null=True),
        _col("function_id", S, null=True),
        _col("ts", F, 0.0),
        _col("kind", S, ""),
        _col("message", S, ""),
        sa.Column("data", sa.JSON),
        sa.Index("ix_event_app", "app_id", "id"),
    )
    sa.Table(
        "log",
        m,
        sa.Column("id", I, primary_key=True),
        _col("app_id", S, ""),
        _col("function_id", S, null=True),
        _col("worker_id", S, null=True),
        _col("call_id", S, null=True),
        _col("stream", S, "stdout"),
        _col("ts", F, 0.0),
        _col("text", S, ""),
        sa.Index("ix_log_app", "app_id", "id"),
    )
    return m


def upgrade() -> None:
    bind = op.get_bind()
    schema(bind.dialect.name).create_all(bind)


def downgrade() -> None:
    bind = op.get_bind()
    schema(bind.dialect.name).drop_all(bind)


def adopt(conn: sa.Connection) -> list[str]:
    """Bring a database made before migrations to this revision's schema, by additions only: the tables
    and indexes it lacks, and its missing nullable columns (development versions before 0.1.0 grew so).
    Returns what was added (``table``, ``table.column``, ``index``); raises ``ValueError`` naming a missing
    column that cannot be added in place (NOT NULL without a server default)."""
    m = schema(conn.dialect.name)
    insp = sa.inspect(conn)
    have_tables = set(insp.get_table_names())
    added: list[str] = []
    for table in m.sorted_tables:
        if table.name not in have_tables:
            table.create(conn)
            added.append(table.name)
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise ValueError(
                    f"the database lacks column {table.name}.{col.name}, which cannot be added in place"
                )
            kind = col.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {kind}'))
            added.append(f"{table.name}.{col.name}")
        indexes = {ix["name"] for ix in insp.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
                added.append(str(index.name))
    return added
