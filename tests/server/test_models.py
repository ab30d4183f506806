"""The control-plane schema is pinned: DDL and column defaults on both databases match the files in
``data/``. A change to them is a schema change: it needs a migration (``python -m cloudmodal.server.migrations
new "..."``, see :mod:`cloudmodal.server.migrations`), then regenerate these files deliberately with ``python
tests/server/test_models.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from cloudmodal.server import models
from cloudmodal.server.db import Database

DATA = Path(__file__).parent / "data"


def schema(dialect: object, metadata: MetaData = models.metadata) -> str:
    out = []
    for t in sorted(metadata.tables.values(), key=lambda t: t.name):
        out.append(str(CreateTable(t).compile(dialect=dialect)).strip() + ";")
        for ix in sorted(t.indexes, key=lambda i: str(i.name)):
            out.append(str(CreateIndex(ix).compile(dialect=dialect)).strip() + ";")
        for c in t.columns:
            if c.default is not None:
                out.append(f"-- default {t.name}.{c.name} = {c.default.arg!r}")  # type: ignore[attr-defined]
    return "\n".join(out) + "\n"


def pg_schema() -> str:
    models.use_postgresql_partial_indexes()  # what Database does on PostgreSQL
    return schema(postgresql.dialect())


def test_sqlite_schema_is_pinned() -> None:
    assert schema(sqlite.dialect()) == (DATA / "schema.sqlite.sql").read_text()


def test_postgresql_schema_is_pinned() -> None:
    assert pg_schema() == (DATA / "schema.postgresql.sql").read_text()


def test_partial_indexes_exist_in_real_databases(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    db = Database(f"sqlite:///{tmp_path / 'cm.db'}")
    with db.read() as conn:
        sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_input_pending'")).scalar_one()
    db.dispose()
    assert sql.endswith("WHERE state = 0")
    db = Database(request.getfixturevalue("postgres_database"))
    with db.read() as conn:
        rows = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'input'"))
        defs = {name: sql for name, sql in rows}
    db.dispose()
    assert defs["ix_input_pending"].endswith("WHERE (state = 0)")
    assert defs["ix_input_open"].endswith("WHERE (state < 2)")


if __name__ == "__main__":  # regenerate the pinned files
    (DATA / "schema.sqlite.sql").write_text(schema(sqlite.dialect()))
    (DATA / "schema.postgresql.sql").write_text(pg_schema())
    sys.exit(0)
