"""schedules: deployed functions' next ticks

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 09:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule",
        sa.Column("schedule", sa.JSON(), nullable=False),
        sa.Column("function_id", sa.String(), nullable=False),
        sa.Column("app_id", sa.String(), nullable=False),
        sa.Column("anchor", sa.Float(), nullable=False),
        sa.Column("next_fire_at", sa.Float(), nullable=False),
        sa.Column("last_fired_at", sa.Float(), nullable=True),
        sa.Column("last_call_id", sa.String(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("function_id"),
    )
    op.create_index("ix_schedule_due", "schedule", ["next_fire_at"], unique=False)
    op.create_index(op.f("ix_schedule_app_id"), "schedule", ["app_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_schedule_app_id"), table_name="schedule")
    op.drop_index("ix_schedule_due", table_name="schedule")
    op.drop_table("schedule")
