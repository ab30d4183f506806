"""The control plane's schema migrations (Alembic), applied when a control plane opens its database.

Opening a database costs one query when it is at this release's schema (:data:`HEAD`): the version row
Alembic keeps in ``alembic_version``. Only otherwise does :func:`upgrade` run, and only an existing database
that is behind imports Alembic:

- a new (empty) database gets the models' tables and the head revision's version row in one transaction,
  without Alembic (each embedded ``cloudmodal run`` starts one);
- a database made before migrations existed (release 0.1.0 and earlier: tables, no version row) is brought
  to revision 0001's schema by additions only and stamped there, then upgraded;
- a database behind is upgraded through the revisions in ``versions/``;
- a database ahead of this release (a newer cloudmodal upgraded it) is refused with both revisions named.

Everything runs in one transaction (``BEGIN IMMEDIATE`` on SQLite, whose DDL is transactional; an advisory
lock on PostgreSQL so that control planes starting together upgrade once): a migration that fails leaves the
database as it was.

Adding a revision: change the models in ``models.py``, then run ``python -m cloudmodal.server.migrations new
"what changes"``. It autogenerates ``versions/NNNN_what_changes.py`` from the difference between the models and
a scratch database at the current head, and prints its path; read it (autogenerate cannot see renames,
writes SQLite's changes as batch operations, and a NOT NULL column added to a table with rows needs a
``server_default``), set :data:`HEAD` to the new id, regenerate the pinned DDL
(``python tests/server/test_models.py``), and run ``tests/server/test_migrations.py``: the models and the head
revision must agree, and the saved 0.1.0 database must upgrade.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from cloudmodal.exception import Error

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

HEAD = "0011"  # the newest revision in versions/ (tests/server/test_migrations.py checks it is)
HERE = Path(__file__).parent
VERSION_TABLE = "alembic_version"
LOCK_KEY = 0x636D5F6D6967  # "cm_mig": PostgreSQL advisory lock held while one control plane upgrades

# Alembic's own version table, declared as Alembic declares it (a test compares the two).
_version_metadata = MetaData()
version_table = Table(
    VERSION_TABLE,
    _version_metadata,
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


class SchemaError(Error):
    """The database's schema is not this release's, and cannot be made so here."""


class DatabaseNewerError(SchemaError):
    """The database was upgraded by a newer cloudmodal than this one."""


class MigrationError(SchemaError):
    """A migration failed; its transaction was rolled back."""


class PendingMigrationError(SchemaError):
    """The database is behind this release and migrations were not to be applied."""


@dataclasses.dataclass(frozen=True)
class Upgraded:
    """What :func:`upgrade` did: from which revision (None: none recorded) to which."""

    before: str | None
    after: str
    created: bool = False  # a new database, created at the head revision
    adopted: list[str] = dataclasses.field(default_factory=list)  # added to a database made before 0001

    def describe(self) -> str:
        if self.created:
            return f"Created the database at schema revision {self.after}"
        before = self.before or "none (made by 0.1.0 or earlier)"
        return f"Upgraded the database from schema revision {before} to {self.after}"


def stored_revision(engine: Engine) -> str | None:
    """The revision recorded in the database; None when it records none (no version table, or an empty one).

    One query: this is what every start pays."""
    with engine.connect() as conn:  # a database that does not answer raises here
        try:
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        except DBAPIError:
            conn.rollback()
            return None  # no version table: a new database, or one made before migrations (see upgrade())


def is_newer(revision: str) -> bool:
    """Whether ``revision`` is past this release's head (revision ids are zero-padded sequence numbers)."""
    return not revision.isdigit() or int(revision) > int(HEAD)


def newer_message(revision: str, where: str) -> str:
    return (
        f"The database{' ' + where if where else ''} is at schema revision {revision}, newer than this release of cloudmodal knows "
        f"(its newest is {HEAD}): a newer cloudmodal upgraded it. Use that version (pip install -U "
        "cloudmodal), or point CLOUDMODAL_DATABASE_URL at another database. Nothing was changed."
    )


def ensure(engine: Engine, *, apply: bool = True) -> Upgraded | None:
    """Make the database behind ``engine`` this release's schema: None when it already is (one query), else
    what was done. Raises :class:`DatabaseNewerError` for a database ahead of this release,
    :class:`PendingMigrationError` when it is behind and ``apply`` is false, :class:`MigrationError` when a
    migration fails (the database is left as it was)."""
    revision = stored_revision(engine)
    if revision == HEAD:
        return None
    where = _where(engine)
    if revision is not None and is_newer(revision):
        raise DatabaseNewerError(newer_message(revision, where))
    if not apply:
        raise PendingMigrationError(
            f"The database {where} is at schema revision {revision or 'none (0.1.0 or new)'}; this release "
            f"needs {HEAD}. Run `cloudmodal server migrate` (or start the control plane, which migrates)."
        )
    return upgrade(engine)


def upgrade(engine: Engine) -> Upgraded | None:
    """Bring the database to :data:`HEAD` in one transaction (see the module's docstring)."""
    where = _where(engine)
    migrator = _transactional_engine(engine)
    try:
        with migrator.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
            return _upgrade(conn, where)
    except SchemaError:
        raise
    except Exception as e:
        raise MigrationError(
            f"Upgrading the database {where} to schema revision {HEAD} failed, and nothing was changed (the "
            f"upgrade ran in one transaction): {type(e).__name__}: {e}"
        ) from e
    finally:
        migrator.dispose()


def _upgrade(conn: Connection, where: str) -> Upgraded | None:
    from sqlalchemy import inspect

    from cloudmodal.server import models

    insp = inspect(conn)
    tables = set(insp.get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        revision = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    if revision == HEAD:
        return None  # another control plane upgraded it while this one waited for the lock
    if revision is None and not tables & set(models.metadata.tables):
        models.metadata.create_all(conn, checkfirst=False)  # none of them exists (checked above)
        _stamp(conn, HEAD)
        return Upgraded(None, HEAD, created=True)

    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    config = alembic_config(conn)
    scripts = ScriptDirectory.from_config(config)
    adopted: list[str] = []
    if revision is None:
        first = scripts.get_revision("0001")
        assert first is not None
        try:
            adopted = first.module.adopt(conn)
        except ValueError as e:
            raise MigrationError(
                f"The database {where} has tables but no schema revision, and is not one a cloudmodal release "
                f"made: {e}. Nothing was changed; use another database (CLOUDMODAL_DATABASE_URL)."
            ) from None
        _stamp(conn, "0001")
    else:
        try:
            scripts.get_revision(revision)
        except CommandError:
            raise DatabaseNewerError(newer_message(revision, where)) from None
    command.upgrade(config, "head")
    return Upgraded(revision, HEAD, adopted=adopted)


def alembic_config(conn: Connection | None = None, url: str | None = None) -> Any:
    """Alembic's configuration, in code: the scripts beside this file; ``conn`` for env.py to run on."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def _stamp(conn: Connection, revision: str) -> None:
    version_table.create(conn, checkfirst=True)
    conn.execute(version_table.delete())
    conn.execute(version_table.insert().values(version_num=revision))


def _where(engine: Engine) -> str:
    """The database, for messages (never its password)."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return url.render_as_string(hide_password=True)


def _transactional_engine(engine: Engine) -> Engine:
    """A one-connection engine on ``engine``'s database whose transactions hold DDL too.

    Python's sqlite3 (before 3.12) neither begins a transaction before DDL nor lets SQLAlchemy do it, so
    each ``CREATE``/``ALTER`` would commit on its own: here the driver's handling is off and every
    transaction is an explicit ``BEGIN IMMEDIATE`` (which also waits for other writers, such as another
    control plane upgrading the same file)."""
    if engine.url.get_backend_name() != "sqlite":
        return create_engine(engine.url, poolclass=NullPool)
    migrator = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 30})

    @event.listens_for(migrator, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(migrator, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migrator
