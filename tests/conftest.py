"""Shared fixtures: isolated state directories, and real control planes on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").exists() else None
POSTGRES_URL = os.environ.get(
    "CLOUDMODAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never touch the developer's ~/.cloudmodal; share one cache (built venvs, sources) per session."""
    home = tmp_path_factory.mktemp("cloudmodal-home")
    keys = ("CLOUDMODAL_HOME", "CLOUDMODAL_CACHE_DIR", "CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["CLOUDMODAL_HOME"] = str(home / "home")
    os.environ["CLOUDMODAL_CACHE_DIR"] = str(home / "cache")
    os.environ.pop("CLOUDMODAL_SERVER_URL", None)
    os.environ.pop("CLOUDMODAL_TOKEN", None)  # a developer's token must not reach the tests' servers
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def postgres_available() -> str | None:
    """None if PostgreSQL answers, else the reason it does not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'cloudmodal[postgres]')"
    dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return None
    except Exception as e:
        return f"PostgreSQL at {dsn} does not answer ({type(e).__name__}); start it or set CLOUDMODAL_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def new_postgres_database() -> Iterator[Callable[[], str]]:
    """Makes fresh databases on the test PostgreSQL server (dropped at the end of the session).

    Every control plane gets a database of its own: two control planes sharing one would both reconcile
    the same pools."""
    reason = postgres_available()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    base = POSTGRES_URL.rsplit("/", 1)[0]
    made: list[str] = []

    def make() -> str:
        name = "cm_test_" + secrets.token_hex(6)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    yield make
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_database(new_postgres_database: Callable[[], str]) -> str:
    return new_postgres_database()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cloudmodal.db'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def python() -> str:
    return sys.executable
