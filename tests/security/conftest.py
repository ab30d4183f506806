"""The attacks of issue 9 against real control planes (HTTP on 127.0.0.1, real databases, real worker
processes, another Unix user where the attack needs one). Each attack test has a negative control: the same
request made by someone entitled to it succeeds, so a refusal is the check working, not a malformed request."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmodal.server.app import ServerHandle

HERE = Path(__file__).parent
for p in (HERE, HERE / "apps"):  # the helpers, and the apps the workers import
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from security_support import Api, owner_token  # noqa: E402
from support import start_server  # noqa: E402  (tests/integration is on pytest's pythonpath)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One real control plane (SQLite, local worker processes) for a test module."""
    state = tmp_path_factory.mktemp("sec-cp")
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def owner(plane: ServerHandle) -> Iterator[Api]:
    api = Api(plane.url, owner_token(plane))
    yield api
    api.close()
