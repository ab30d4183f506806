"""queue items keyed by their order index alone on PostgreSQL, and a BRIN index on dict entries' updated_at
there (see :mod:`cloudmodal.server.models_kv`); on SQLite the order index becomes unique, as on PostgreSQL

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:45:06
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        # the ids (the rowid) are unique already: building the unique index cannot fail
        op.drop_index("ix_kv_queue_item_order", table_name="kv_queue_item")
        op.create_index(
            "ix_kv_queue_item_order", "kv_queue_item", ["queue_id", "partition", "id"], unique=True
        )
        return
    # the unique index built before the key and the old index go (ids come from one sequence: unique already)
    op.create_index("ix_kv_queue_item_key", "kv_queue_item", ["queue_id", "partition", "id"], unique=True)
    op.drop_index("ix_kv_queue_item_order", table_name="kv_queue_item")
    op.execute("ALTER INDEX ix_kv_queue_item_key RENAME TO ix_kv_queue_item_order")
    op.execute("ALTER TABLE kv_queue_item REPLICA IDENTITY USING INDEX ix_kv_queue_item_order")
    op.execute("ALTER TABLE kv_queue_item DROP CONSTRAINT kv_queue_item_pkey")
    op.drop_index("ix_kv_dict_entry_updated", table_name="kv_dict_entry")
    op.create_index("ix_kv_dict_entry_updated", "kv_dict_entry", ["updated_at"], postgresql_using="brin")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_kv_dict_entry_updated", table_name="kv_dict_entry")
        op.create_index("ix_kv_dict_entry_updated", "kv_dict_entry", ["updated_at"])
        op.execute("ALTER TABLE kv_queue_item ADD CONSTRAINT kv_queue_item_pkey PRIMARY KEY (id)")
        op.execute("ALTER TABLE kv_queue_item REPLICA IDENTITY DEFAULT")
    op.drop_index("ix_kv_queue_item_order", table_name="kv_queue_item")
    op.create_index("ix_kv_queue_item_order", "kv_queue_item", ["queue_id", "partition", "id"])
