"""dict entries keyed by the raw sha256 of their key (bytes) instead of its hex text

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 10:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE kv_dict_entry ALTER COLUMN key_hash TYPE bytea USING decode(key_hash, 'hex')")
        return
    # SQLite 3.40 (Python 3.11's) has no unhex(): convert in Python, then give the column its new type (the
    # batch copy casts to BLOB, which leaves a blob as it is)
    rows = bind.execute(sa.text("SELECT rowid, key_hash FROM kv_dict_entry")).all()
    if rows:
        bind.execute(
            sa.text("UPDATE kv_dict_entry SET key_hash = :h WHERE rowid = :r"),
            [{"h": bytes.fromhex(h), "r": r} for r, h in rows],
        )
    with op.batch_alter_table("kv_dict_entry", schema=None) as batch_op:
        batch_op.alter_column("key_hash", existing_type=sa.String(), type_=sa.LargeBinary())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE kv_dict_entry ALTER COLUMN key_hash TYPE varchar USING encode(key_hash, 'hex')"
        )
        return
    rows = bind.execute(sa.text("SELECT rowid, key_hash FROM kv_dict_entry")).all()
    if rows:
        bind.execute(
            sa.text("UPDATE kv_dict_entry SET key_hash = :h WHERE rowid = :r"),
            [{"h": bytes(h).hex(), "r": r} for r, h in rows],
        )
    with op.batch_alter_table("kv_dict_entry", schema=None) as batch_op:
        batch_op.alter_column("key_hash", existing_type=sa.LargeBinary(), type_=sa.String())
