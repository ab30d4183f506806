"""A real control plane (HTTP on 127.0.0.1, a real database, real worker processes) per test module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.server.app import ServerHandle

APPS = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS))


from support import start_server, use_server  # noqa: E402


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("cp")
    if request.param == "sqlite":
        url = f"sqlite:///{state / 'cloudmodal.db'}"
    else:
        url = request.getfixturevalue("new_postgres_database")()
    handle = start_server(state, url)
    try:
        with use_server(handle):
            yield handle
    finally:
        handle.stop()
