"""cost ledger, app tags and budgets

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 12:31:55

Workers that stopped before the ledger existed are marked closed: the ledger starts with this revision and
does not bill the past again (their rows still hold what they cost, for who wants it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_hour",
        sa.Column("hour", sa.Float(), nullable=False),
        sa.Column("app_id", sa.String(), nullable=False),
        sa.Column("function_id", sa.String(), nullable=False),
        sa.Column("gpu", sa.String(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("market", sa.String(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("idle_seconds", sa.Float(), nullable=False),
        sa.Column("idle_cost", sa.Float(), nullable=False),
        sa.Column("spot_cost", sa.Float(), nullable=False),
        sa.Column("spot_on_demand_cost", sa.Float(), nullable=False),
        sa.Column("minimum_cost", sa.Float(), nullable=False),
        sa.Column("spans", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(
            "hour", "app_id", "function_id", "gpu", "cloud", "market", name="pk_ledger_hour"
        ),
    )
    op.create_index("ix_ledger_hour_app", "ledger_hour", ["app_id", "hour"], unique=False)
    op.create_table(
        "ledger_span",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("app_id", sa.String(), nullable=False),
        sa.Column("function_id", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("instance_type", sa.String(), nullable=False),
        sa.Column("gpu", sa.String(), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("market", sa.String(), nullable=False),
        sa.Column("price_per_hour", sa.Float(), nullable=False),
        sa.Column("on_demand_per_hour", sa.Float(), nullable=True),
        sa.Column("t0", sa.Float(), nullable=False),
        sa.Column("t1", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("idle_seconds", sa.Float(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("worker_id", "t0", "kind", name="uq_ledger_span_worker_t0_kind"),
    )
    op.create_index("ix_ledger_span_app_t0", "ledger_span", ["app_id", "t0"], unique=False)
    op.create_index("ix_ledger_span_t0", "ledger_span", ["t0"], unique=False)
    op.create_table(
        "ledger_worker",
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("app_id", sa.String(), nullable=False),
        sa.Column("function_id", sa.String(), nullable=False),
        sa.Column("function_name", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("cloud", sa.String(), nullable=False),
        sa.Column("region", sa.String(), nullable=False),
        sa.Column("instance_type", sa.String(), nullable=False),
        sa.Column("gpu", sa.String(), nullable=False),
        sa.Column("market", sa.String(), nullable=False),
        sa.Column("price_per_hour", sa.Float(), nullable=False),
        sa.Column("on_demand_per_hour", sa.Float(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("launched_at", sa.Float(), nullable=False),
        sa.Column("last_heartbeat", sa.Float(), nullable=True),
        sa.Column("stopped_at", sa.Float(), nullable=False),
        sa.Column("stop_reason", sa.String(), nullable=False),
        sa.Column("billed_seconds", sa.Float(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id"),
    )
    op.create_index("ix_ledger_worker_app", "ledger_worker", ["app_id", "stopped_at"], unique=False)
    op.create_table(
        "ledger_app",
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("app_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("app_id"),
    )
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("budget", sa.JSON(), nullable=True))
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.add_column(sa.Column("launched_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("billed_until", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("billing_closed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(sa.text("UPDATE worker SET billing_closed = :t WHERE state = 'stopped'").bindparams(t=True))


def downgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_column("billing_closed")
        batch_op.drop_column("billed_until")
        batch_op.drop_column("launched_at")
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.drop_column("budget")
        batch_op.drop_column("tags")
    op.drop_table("ledger_app")
    op.drop_index("ix_ledger_worker_app", table_name="ledger_worker")
    op.drop_table("ledger_worker")
    op.drop_index("ix_ledger_span_t0", table_name="ledger_span")
    op.drop_index("ix_ledger_span_app_t0", table_name="ledger_span")
    op.drop_table("ledger_span")
    op.drop_index("ix_ledger_hour_app", table_name="ledger_hour")
    op.drop_table("ledger_hour")
