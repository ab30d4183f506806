"""dicts and queues

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kv_dict",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "kv_dict_entry",
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("dict_id", sa.String(), nullable=False),
        sa.Column("key_hash", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("dict_id", "key_hash"),
    )
    op.create_index("ix_kv_dict_entry_updated", "kv_dict_entry", ["updated_at"], unique=False)
    op.create_table(
        "kv_queue",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("ephemeral", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("last_used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "kv_queue_item",
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue_id", sa.String(), nullable=False),
        sa.Column("partition", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_kv_queue_item_order", "kv_queue_item", ["queue_id", "partition", "id"], unique=False)
    op.create_table(
        "kv_queue_partition",
        sa.Column("queue_id", sa.String(), nullable=False),
        sa.Column("partition", sa.String(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("queue_id", "partition"),
    )
    op.create_index("ix_kv_queue_partition_expires", "kv_queue_partition", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_kv_queue_partition_expires", table_name="kv_queue_partition")
    op.drop_table("kv_queue_partition")
    op.drop_index("ix_kv_queue_item_order", table_name="kv_queue_item")
    op.drop_table("kv_queue_item")
    op.drop_table("kv_queue")
    op.drop_index("ix_kv_dict_entry_updated", table_name="kv_dict_entry")
    op.drop_table("kv_dict_entry")
    op.drop_table("kv_dict")
