"""A real control plane (HTTP on 127.0.0.1, a real database, real worker processes) per test module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.client import session as session_mod
from cloudmodal.server.app import ServerHandle, default_settings

APPS = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS))


def start_server(state_dir: Path, database_url: str, **settings: object) -> ServerHandle:
    base = dict(lease_s=6.0, heartbeat_s=0.5, worker_timeout_s=10.0, client_timeout_s=60.0, reconcile_interval_s=0.1)
    base.update(settings)
    return ServerHandle(default_settings(state_dir, database_url=database_url, **base)).start_in_thread()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def control_plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
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
