"""A real control plane (HTTP on 127.0.0.1, a real database, real worker processes) per test module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.client import session as session_mod
from cloudmodal.server.app import ServerHandle

APPS = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS))


from support import start_server  # noqa: E402


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
    os.environ["CLOUDMODAL_SERVER_URL"] = handle.url
    session_mod.disconnect()
    try:
        yield handle
    finally:
        session_mod.disconnect()
        os.environ.pop("CLOUDMODAL_SERVER_URL", None)
        handle.stop()
