"""Schema migrations: the models and the head revision agree, a new database is made without Alembic, and a
database made by release 0.1.0 upgrades in place and then serves calls.

``data/release-0.1.0.sqlite3`` was made by release 0.1.0's code (``data/make_release_db.py``, run from a
worktree of that release): an ephemeral app that ran ``.remote()``, ``.map()``, a failing call, a generator
and a ``.spawn()``, and a deployed app called once. Its rows are from 2026-12-04.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from cloudmodal.server import migrations, models
from cloudmodal.server.db import Database

DATA = Path(__file__).parent / "data"
RELEASE_DB = DATA / "release-0.1.0.sqlite3"
RELEASE_SPAWN_CALL = "fc-X0ezerRnvhynzX57YZfGhh"  # square.spawn(12)
RELEASE_ROWS = {
    "app": 2,
    "function": 4,
    "call": 6,
    "input": 10,
    "output": 13,
    "worker": 8,
    "pool": 4,
    "event": 35,
    "log": 7,
    "token": 10,
    "deployment": 1,
}
YEARS = 100 * 365 * 86400.0  # retention long enough that the saved rows are never pruned during a test


def _diff(engine: Engine) -> list[object]:
    """What Alembic's autogenerate sees between the database and the models (nothing: they agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return list(
            compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), models.metadata)
        )


def _revision(engine: Engine) -> str | None:
    return migrations.stored_revision(engine)


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t: conn.execute(select(func.count()).select_from(models.metadata.tables[t])).scalar_one()
            for t in RELEASE_ROWS
        }


def _url(kind: str, tmp_path: Path, new_pg: Callable[[], str] | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cm.db'}"
    assert new_pg is not None
    models.use_postgresql_partial_indexes()  # what Database does on PostgreSQL
    return new_pg()


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def new_pg(kind: str, request: pytest.FixtureRequest) -> Callable[[], str] | None:
    return request.getfixturevalue("new_postgres_database") if kind == "postgres" else None


def test_head_is_the_newest_revision() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrations.alembic_config())
    assert scripts.get_heads() == [migrations.HEAD]


def test_the_version_table_is_alembics() -> None:
    """The version row a new database gets without Alembic is the one Alembic writes and reads."""
    from alembic.migration import MigrationContext
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateTable

    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        theirs = MigrationContext.configure(conn)._version
    ddl = lambda t: str(CreateTable(t).compile(dialect=sqlite.dialect()))  # noqa: E731
    assert ddl(migrations.version_table) == ddl(theirs)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_revision_0001_is_the_schema_release_0_1_0_made(dialect: str) -> None:
    """``schema-0.1.0.*.sql`` is the DDL 0.1.0's code produced (its pinned files, kept as they were)."""
    import importlib.util

    from alembic.script import ScriptDirectory
    from sqlalchemy.dialects import postgresql, sqlite

    spec = importlib.util.spec_from_file_location("pinned_ddl", Path(__file__).parent / "test_models.py")
    assert spec is not None and spec.loader is not None
    pinned = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pinned)  # its schema(): how the pinned files are written

    first = ScriptDirectory.from_config(migrations.alembic_config()).get_revision("0001")
    assert first is not None
    compiler = {"sqlite": sqlite, "postgresql": postgresql}[dialect].dialect()
    assert (
        pinned.schema(compiler, first.module.schema(dialect))
        == (DATA / f"schema-0.1.0.{dialect}.sql").read_text()
    )


def test_models_and_the_migrations_agree(kind: str, tmp_path: Path, new_pg: Callable[[], str] | None) -> None:
    """The revisions, run from an empty database, make the schema the models declare: no difference for
    autogenerate to find. Fails when a model changed without a revision."""
    from alembic import command

    engine = create_engine(_url(kind, tmp_path, new_pg), poolclass=NullPool)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "head")
    assert _revision(engine) == migrations.HEAD
    assert _diff(engine) == []
    engine.dispose()


def test_a_new_database_is_made_at_head_without_alembic(tmp_path: Path) -> None:
    """An embedded `cloudmodal run` opens a new database each time: it must not pay Alembic's import, nor
    does a start on a database already at head. The schema is the same as the revisions make."""
    url = f"sqlite:///{tmp_path / 'cm.db'}"
    probe = (
        "import sys; from cloudmodal.server.db import Database\n"
        f"db = Database({url!r}); db.dispose()\n"
        "print(repr(db.upgraded and db.upgraded.created), 'alembic' in sys.modules)\n"
    )
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert first.stdout.split() == ["True", "False"]
    assert again.stdout.split() == ["None", "False"]
    engine = create_engine(url, poolclass=NullPool)
    assert _revision(engine) == migrations.HEAD
    assert _diff(engine) == []
    engine.dispose()


def test_a_newer_database_is_refused_unchanged(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    url = _url(kind, tmp_path, new_pg)
    Database(url).dispose()
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(migrations.version_table.update().values(version_num="0999"))
    with pytest.raises(migrations.DatabaseNewerError) as info:
        Database(url)
    assert "0999" in str(info.value) and migrations.HEAD in str(info.value)
    assert _revision(engine) == "0999"
    engine.dispose()


def _legacy(url: str, drop: list[str]) -> Engine:
    """A database as a development version before 0.1.0 left it: 0.1.0's tables, no version row, some
    statements of ``drop`` undone."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrations.alembic_config())
    first = scripts.get_revision("0001")
    assert first is not None
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        first.module.schema(conn.dialect.name).create_all(conn)
        for statement in drop:
            conn.execute(text(statement))
    return engine


def test_a_database_older_than_0_1_0_gets_what_it_lacks(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    url = _url(kind, tmp_path, new_pg)
    engine = _legacy(
        url, ["DROP TABLE pool", "ALTER TABLE call DROP COLUMN created_by", "DROP INDEX ix_input_open"]
    )
    db = Database(url)
    db.dispose()
    assert db.upgraded is not None and db.upgraded.before is None
    assert sorted(db.upgraded.adopted) == ["call.created_by", "ix_input_open", "pool"]
    assert _revision(engine) == migrations.HEAD
    assert _diff(engine) == []
    engine.dispose()


def test_a_failed_migration_changes_nothing(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    """A database lacking a NOT NULL column cannot be brought to 0001 in place: refused, and what was added
    before the refusal (a table, a column) is rolled back with it."""
    url = _url(kind, tmp_path, new_pg)
    engine = _legacy(
        url,
        ["DROP TABLE pool", "ALTER TABLE call DROP COLUMN created_by", "ALTER TABLE worker DROP COLUMN host"],
    )
    with pytest.raises(migrations.MigrationError, match="worker.host.*Nothing was changed"):
        Database(url)
    with engine.connect() as conn:
        insp = inspect(conn)
        assert "pool" not in insp.get_table_names()
        assert migrations.VERSION_TABLE not in insp.get_table_names()
        assert "created_by" not in {c["name"] for c in insp.get_columns("call")}
    engine.dispose()


def _release_database(kind: str, tmp_path: Path, new_pg: Callable[[], str] | None) -> str:
    """The saved 0.1.0 database, copied to ``tmp_path`` (SQLite), or its rows in a new PostgreSQL database
    that 0.1.0's schema was created in (what 0.1.0 did on PostgreSQL; no version row)."""
    if kind == "sqlite":
        shutil.copy(RELEASE_DB, tmp_path / "cm.db")
        return f"sqlite:///{tmp_path / 'cm.db'}"
    url = _url(kind, tmp_path, new_pg)
    engine = _legacy(url, [])
    source = create_engine(f"sqlite:///{RELEASE_DB}", poolclass=NullPool)
    saved = MetaData()
    saved.reflect(source)  # 0.1.0's own tables: later releases add tables and columns it never had
    with source.connect() as src, engine.begin() as dst:
        made = MetaData()
        made.reflect(dst)  # 0.1.0's schema as created here: inserts carry no later column's default
        for table in models.metadata.sorted_tables:
            if table.name not in saved.tables:
                continue
            rows = [dict(r) for r in src.execute(select(saved.tables[table.name])).mappings()]
            if rows:
                dst.execute(made.tables[table.name].insert(), rows)
            pk = list(table.primary_key.columns)
            if (
                len(pk) == 1 and pk[0].type.python_type is int
            ):  # rows copied with their ids: move the sequence on
                dst.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), (SELECT max(id) FROM \"{table.name}\"))"
                    )
                )
    source.dispose()
    engine.dispose()
    return url


def test_a_release_0_1_0_database_upgrades_and_then_serves_calls(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    """The must-show migration test: a database made by release 0.1.0 is upgraded in place (recognised,
    stamped, upgraded), its rows read back as typed rows and through the API, and a full call path runs on
    it: a real control plane, real worker processes."""
    import basic
    from support import start_server, use_server

    import cloudmodal
    from cloudmodal.client.session import current_session, run_app

    url = _release_database(kind, tmp_path, new_pg)
    engine = create_engine(url, poolclass=NullPool)
    assert _revision(engine) is None
    assert _counts(engine) == RELEASE_ROWS

    db = Database(url)
    db.dispose()
    assert db.upgraded is not None
    assert (db.upgraded.before, db.upgraded.after, db.upgraded.created) == (None, migrations.HEAD, False)
    assert db.upgraded.adopted == []  # 0.1.0 made exactly revision 0001's schema
    assert _revision(engine) == migrations.HEAD
    assert _diff(engine) == []
    assert _counts(engine) == RELEASE_ROWS

    with engine.connect() as conn:
        apps = {
            a.name: a
            for a in (models.App.model_validate(r) for r in conn.execute(select(models.apps)).mappings())
        }
        fns = [models.Function.model_validate(r) for r in conn.execute(select(models.functions)).mappings()]
        logs = [models.Log.model_validate(r) for r in conn.execute(select(models.logs)).mappings()]
        workers = [models.Worker.model_validate(r) for r in conn.execute(select(models.workers)).mappings()]
    # the ledger starts at 0009: workers that stopped before it are closed, never billed again
    assert workers and all(w.billing_closed for w in workers if w.state == "stopped")
    assert apps["release-db"].state == "stopped" and apps["release-db"].ephemeral
    assert apps["release-deployed"].state == "deployed" and not apps["release-deployed"].ephemeral
    assert sorted(f.name for f in fns) == ["countdown", "double", "fail", "square"]
    assert all(isinstance(f.spec, dict) for f in fns)
    assert "squaring 7" in [log.text for log in logs]
    engine.dispose()

    state = tmp_path / "state"
    state.mkdir()
    retention = {k: YEARS for k in ("retention_calls_ephemeral_s", "retention_calls_deployed_s")}
    retention |= {k: YEARS for k in ("retention_logs_ephemeral_s", "retention_logs_deployed_s")}
    handle = start_server(state, url, **retention)
    try:
        assert handle.cp.db.upgraded is None  # at head already
        with use_server(handle):
            assert cloudmodal.FunctionCall.from_id(RELEASE_SPAWN_CALL).get() == 144
            listed = current_session().transport.get("/v1/apps", all=True)  # the read API shows the old apps
            assert {"release-db", "release-deployed"} <= {a["name"] for a in listed}
            with run_app(basic.app, show_logs=False):
                assert basic.square.remote(9) == 81
                assert list(basic.square.map(range(20))) == [i * i for i in range(20)]
                assert list(basic.countdown.remote_gen(3)) == [0, 1, 2]
                with pytest.raises(ValueError, match="bad input 4"):
                    basic.fail.remote(4)
    finally:
        handle.stop()
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(models.apps)).scalar_one() == 3
    engine.dispose()


def test_server_migrate_check_and_apply(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cloudmodal.cli.server_cmd import app

    shutil.copy(RELEASE_DB, tmp_path / "cm.db")
    url = f"sqlite:///{tmp_path / 'cm.db'}"
    runner = CliRunner()
    check = runner.invoke(app, ["migrate", "--check", "--database-url", url])
    assert check.exit_code == 1 and f"needs {migrations.HEAD}" in check.output
    done = runner.invoke(app, ["migrate", "--database-url", url])
    assert done.exit_code == 0, done.output
    made_by_release = "from schema revision none (made by 0.1.0 or earlier)"
    assert f"Upgraded the database {made_by_release} to {migrations.HEAD}." in done.output
    again = runner.invoke(app, ["migrate", "--database-url", url])
    assert again.exit_code == 0 and "nothing to do" in again.output
    check = runner.invoke(app, ["migrate", "--check", "--database-url", url])
    assert check.exit_code == 0 and "this release's" in check.output


def _newer_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cm.db'}"
    Database(url).dispose()
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(migrations.version_table.update().values(version_num="0999"))
    engine.dispose()
    return url


@pytest.mark.parametrize("mode", ["--foreground", "background"])
def test_server_start_refuses_a_newer_database_and_says_why(tmp_path: Path, mode: str) -> None:
    """`cloudmodal server start` on a database a newer release upgraded: it exits naming both revisions and
    what to do, in the foreground and (through the log it shows) in the background."""
    import os

    url = _newer_database(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "cloudmodal.cli.main",
        "server",
        "start",
        "--port",
        "0",
        "--database-url",
        url,
    ]
    env = os.environ | {"CLOUDMODAL_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        argv + ([mode] if mode.startswith("--") else []), capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "schema revision 0999" in out and f"its newest is {migrations.HEAD}" in out, out
    assert "pip install -U cloudmodal" in out and "Nothing was changed" in out
    assert "Traceback" not in out
    assert _revision(create_engine(url, poolclass=NullPool)) == "0999"


def test_dict_entries_written_as_hex_hashes_read_back_after_0008(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    """0008 turns each entry's hex key hash into its raw bytes: a dict written before it reads back whole,
    by key and by scan, and takes writes to the same keys (an upsert, not a second row)."""
    import hashlib

    from alembic import command

    from cloudmodal.server.svc_kv import key_hash

    url = _url(kind, tmp_path, new_pg)
    engine = create_engine(url, poolclass=NullPool)
    keys = [f"k{i}".encode() for i in range(5)]
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "0007")
        conn.execute(
            text(
                "INSERT INTO kv_dict (id, name, ephemeral, created_at, created_by, last_used_at) "
                "VALUES ('di-old', 'old', false, 0, '', 0)"
            )
        )
        for k in keys:
            conn.execute(
                text(
                    "INSERT INTO kv_dict_entry (dict_id, key_hash, key, value, updated_at) "
                    "VALUES ('di-old', :h, :k, :v, :t)"
                ),
                {"h": hashlib.sha256(k).hexdigest(), "k": k, "v": b"v-" + k, "t": 1e12},
            )
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "head")
    assert _diff(engine) == []
    engine.dispose()

    from cloudmodal.server.service import ControlPlane, Settings
    from cloudmodal.server.svc_kv import KV

    cp = ControlPlane(Settings(database_url=url, state_dir=tmp_path / "cp"))
    db = cp.db
    try:
        svc = KV(cp)
        assert svc.dict_get("di-old", keys) == [b"v-" + k for k in keys]
        rows, cursor = svc.dict_scan("di-old", "", 100, keys=True, values=True)
        assert sorted(rows) == sorted([k, b"v-" + k] for k in keys) and cursor is None
        page, cursor = svc.dict_scan("di-old", "", 2, keys=True, values=False)
        rest, _ = svc.dict_scan("di-old", cursor or "", 100, keys=True, values=False)
        assert sorted(r[0] for r in page + rest) == sorted(keys)
        assert cursor == key_hash(page[-1][0]).hex()  # the cursor names the page's last key
        svc.dict_put("di-old", [(keys[0], b"new")], skip_if_exists=False)
        assert svc.dict_get("di-old", keys[:1]) == [b"new"]
        with db.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM kv_dict_entry")).scalar_one() == len(keys)
    finally:
        db.dispose()


def test_queue_items_and_dict_entries_survive_0010(
    kind: str, tmp_path: Path, new_pg: Callable[[], str] | None
) -> None:
    """0010 re-keys queue items and re-indexes dict entries: items written before it are taken after it in
    their order (and new ones follow them), entries read back and take upserts; on PostgreSQL the tables have
    the indexes the models declare there (``models_kv``), as a new database made from the models has."""
    from alembic import command

    from cloudmodal.server.svc_kv import key_hash

    url = _url(kind, tmp_path, new_pg)
    engine = create_engine(url, poolclass=NullPool)
    keys = [f"k{i}".encode() for i in range(5)]
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "0009")
        conn.execute(
            text(
                "INSERT INTO kv_dict (id, name, ephemeral, created_at, created_by, last_used_at) "
                "VALUES ('di-old', 'old', false, 0, '', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO kv_queue (id, name, ephemeral, created_at, created_by, last_used_at) "
                "VALUES ('qu-old', 'oldq', false, 0, '', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO kv_queue_partition (queue_id, partition, expires_at, items, bytes) "
                "VALUES ('qu-old', '', :t, 3, 6)"
            ),
            {"t": 1e12},
        )
        for v in (b"item-0", b"item-1", b"item-2"):
            conn.execute(
                text(
                    "INSERT INTO kv_queue_item (queue_id, partition, value, created_at) "
                    "VALUES ('qu-old', '', :v, 0)"
                ),
                {"v": v},
            )
        for k in keys:
            conn.execute(
                text(
                    "INSERT INTO kv_dict_entry (dict_id, key_hash, key, value, updated_at) "
                    "VALUES ('di-old', :h, :k, :v, :t)"
                ),
                {"h": key_hash(k), "k": k, "v": b"v-" + k, "t": 1e12},
            )
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "head")
    assert _diff(engine) == []
    migrated = _kv_index_forms(engine)
    engine.dispose()

    from cloudmodal.server.service import ControlPlane, Settings
    from cloudmodal.server.svc_kv import KV

    cp = ControlPlane(Settings(database_url=url, state_dir=tmp_path / "cp"))
    try:
        svc = KV(cp)
        assert svc.dict_get("di-old", keys) == [b"v-" + k for k in keys]
        svc.dict_put("di-old", [(keys[0], b"new")], skip_if_exists=False)
        assert svc.dict_get("di-old", keys[:2]) == [b"new", b"v-" + keys[1]]
        assert [v for _, v in svc.queue_peek("qu-old", "", 0, 10)] == [b"item-0", b"item-1", b"item-2"]
        svc.queue_put("qu-old", "", [b"item-3", b"item-4"], 3600)
        assert svc.queue_get("qu-old", "", 2) == [b"item-0", b"item-1"]
        assert svc.queue_get("qu-old", "", 10) == [b"item-2", b"item-3", b"item-4"]
        with cp.db.read() as conn:
            assert conn.execute(text("SELECT count(*) FROM kv_dict_entry")).scalar_one() == len(keys)
            assert conn.execute(text("SELECT count(*) FROM kv_queue_item")).scalar_one() == 0
    finally:
        cp.db.dispose()

    # a new database, made from the models without Alembic, has the same forms
    fresh_url = _url(kind, tmp_path / "fresh", new_pg)
    (tmp_path / "fresh").mkdir()
    fresh = ControlPlane(Settings(database_url=fresh_url, state_dir=tmp_path / "fresh" / "cp"))
    fresh.db.dispose()
    fresh_engine = create_engine(fresh_url, poolclass=NullPool)
    try:
        assert _kv_index_forms(fresh_engine) == migrated
    finally:
        fresh_engine.dispose()
    if kind == "sqlite":
        assert migrated == {"ix_kv_queue_item_order": "CREATE UNIQUE INDEX", "queue_item_key": "id"}
    else:
        assert migrated == {
            "ix_kv_dict_entry_updated": "brin",
            "ix_kv_queue_item_order": "CREATE UNIQUE INDEX btree",
            "queue_item_key": None,  # no primary key: the unique index is the key
            "replica_identity": "ix_kv_queue_item_order",
        }


def _kv_index_forms(engine: Engine) -> dict[str, object]:
    """What 0010 changes, as the database reports it."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            order = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'ix_kv_queue_item_order'")
            ).scalar_one()
            key = [r[1] for r in conn.execute(text("PRAGMA table_info(kv_queue_item)")) if r[5]]
            return {"ix_kv_queue_item_order": " ".join(order.split()[:3]), "queue_item_key": ",".join(key)}
        defs: dict[str, str] = dict(
            conn.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE tablename IN ('kv_queue_item', 'kv_dict_entry') AND indexname LIKE 'ix_%'"
                )
            ).all()
        )
        pkey = conn.execute(
            text(
                "SELECT conname FROM pg_constraint "
                "WHERE conrelid = 'kv_queue_item'::regclass AND contype = 'p'"
            )
        ).scalar()
        identity = conn.execute(
            text(
                "SELECT i.indexrelid::regclass::text FROM pg_index i "
                "WHERE i.indrelid = 'kv_queue_item'::regclass AND i.indisreplident"
            )
        ).scalar()
        using = lambda name: defs[name].split(" USING ")[1].split()[0]  # noqa: E731
        return {
            "ix_kv_dict_entry_updated": using("ix_kv_dict_entry_updated"),
            "ix_kv_queue_item_order": (
                "CREATE UNIQUE INDEX " if "UNIQUE" in defs["ix_kv_queue_item_order"] else ""
            )
            + using("ix_kv_queue_item_order"),
            "queue_item_key": pkey,
            "replica_identity": identity,
        }
