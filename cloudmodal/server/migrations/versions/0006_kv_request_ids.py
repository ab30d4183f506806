"""kv request ids: the recorded answers of retried dict and queue requests

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 09:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kv_request",
        sa.Column("result", sa.LargeBinary(), nullable=False),
        sa.Column("object_id", sa.String(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("op", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("object_id", "request_id"),
    )
    op.create_index("ix_kv_request_created", "kv_request", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_kv_request_created", table_name="kv_request")
    op.drop_table("kv_request")
