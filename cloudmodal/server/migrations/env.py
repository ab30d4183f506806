"""Alembic's environment for the control plane's migrations, configured in code (there is no alembic.ini).

:func:`cloudmodal.server.migrations.upgrade` runs it on a connection it has opened (``config.attributes
["connection"]``), inside the transaction that holds the whole upgrade; ``python -m
cloudmodal.server.migrations new`` runs it for autogenerate against a scratch database at the head revision.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from cloudmodal.server import models


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Write SQLModel's ``AutoString`` as ``sa.String()`` (its DDL), so revisions import no sqlmodel."""
    from sqlmodel.sql.sqltypes import AutoString

    if kind == "type" and isinstance(obj, AutoString):
        return "sa.String()"
    return False


def run(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=models.metadata,
        render_as_batch=True,  # SQLite alters a table by copying it: autogenerate writes batch operations
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "", poolclass=NullPool)
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
