"""A client of this machine's `server start` outlives a restart: the restarted server revokes the owner token
the client read, and the client takes the new one from server.json on the 401 instead of failing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import start_server

from cloudmodal.client.transport import Transport
from cloudmodal.exception import AuthError
from cloudmodal.server.app import ServerHandle


@pytest.fixture(scope="module")
def handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state: Path = tmp_path_factory.mktemp("refresh")
    h = start_server(state, f"sqlite:///{state / 'cp.db'}")
    try:
        yield h
    finally:
        h.stop()


def _revoked(handle: ServerHandle) -> str:
    token_id, token = handle.cp.tokens.create_token("owner", "before the restart")
    handle.cp.tokens.revoke(token_id)
    return token


def test_http_requests_take_the_new_token(handle: ServerHandle) -> None:
    t = Transport(handle.url, _revoked(handle), reconnect_timeout=2, refresh_token=lambda: handle.token)
    assert isinstance(t.get("/v1/apps"), list)
    assert isinstance(t.get("/v1/apps"), list)  # and keeps it


def test_websocket_channels_take_the_new_token(handle: ServerHandle) -> None:
    t = Transport(handle.url, _revoked(handle), reconnect_timeout=2, refresh_token=lambda: handle.token)
    with pytest.raises(Exception) as e:  # past authentication: an unknown function, not a 401
        t.channel("/v1/calls").call({"call_id": "fc-x", "function_id": "fu-none", "kind": "remote"})
    assert not isinstance(e.value, AuthError), e.value


def test_without_a_newer_token_the_401_stands(handle: ServerHandle) -> None:
    """Negative control: the same revoked token with nothing to refresh from is refused."""
    stale = _revoked(handle)
    for refresh in (None, lambda: stale):
        t = Transport(handle.url, stale, reconnect_timeout=2, refresh_token=refresh)
        with pytest.raises(AuthError):
            t.get("/v1/apps")
