"""Every route of the control plane, with every identity: the access each route declares is the one written
down here (a new route fails this test until its access is decided), and a real server enforces it: no
token -> 401, an identity the level excludes -> 403, an identity it admits gets past authorization."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
from sqlalchemy import select
from support import start_server, use_server
from walk import app, echo

from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.security import ACCESS_KINDS

# (method, path) -> access level: the security review of the route table, in one place (see SECURITY.md)
EXPECTED = {
    ("GET", "/healthz"): "public",
    ("POST", "/v1/apps"): "member",
    ("GET", "/v1/apps"): "member",
    ("GET", "/v1/apps/{name_or_id}"): "member",
    ("POST", "/v1/apps/{app_id}/heartbeat"): "member",
    ("POST", "/v1/apps/{app_id}/stop"): "member",
    ("POST", "/v1/apps/{app_id}/deployments"): "member",
    ("GET", "/v1/apps/{name_or_id}/history"): "member",
    ("GET", "/v1/apps/{app_id}/logs"): "member",
    ("GET", "/v1/apps/{app_id}/events"): "member",
    ("POST", "/v1/functions"): "caller",
    ("GET", "/v1/functions/lookup"): "caller",
    ("GET", "/v1/functions/{function_id}"): "caller",
    ("POST", "/v1/calls"): "caller",
    ("POST", "/v1/calls/{call_id}/inputs"): "caller",
    ("POST", "/v1/calls/{call_id}/outputs"): "caller",
    ("GET", "/v1/calls/{call_id}"): "caller",
    ("POST", "/v1/calls/{call_id}/cancel"): "caller",
    ("POST", "/v1/blobs"): "caller",
    ("GET", "/v1/blobs/{blob_id}"): "caller",
    ("POST", "/v1/workers/{worker_id}/register"): "worker",
    ("POST", "/v1/workers/{worker_id}/ready"): "worker",
    ("POST", "/v1/workers/{worker_id}/claim"): "worker",
    ("POST", "/v1/workers/{worker_id}/outputs"): "worker",
    ("POST", "/v1/workers/{worker_id}/heartbeat"): "worker",
    ("POST", "/v1/workers/{worker_id}/logs"): "worker",
    ("POST", "/v1/workers/{worker_id}/release"): "worker",
    ("POST", "/v1/workers/{worker_id}/preempting"): "worker",
    ("POST", "/v1/workers/{worker_id}/stopped"): "worker",
    ("POST", "/v1/tokens"): "owner",
    ("GET", "/v1/tokens"): "owner",
    ("POST", "/v1/tokens/{token_id}/revoke"): "owner",
    ("POST", "/v1/secrets"): "member",
    ("GET", "/v1/secrets"): "member",
    ("GET", "/v1/cost"): "member",
    ("GET", "/dashboard"): "public",
    ("POST", "/v1/functions/{function_id}/autoscaler"): "member",
    ("GET", "/v1/functions/{function_id}/stats"): "caller",
    ("POST", "/v1/containers/list"): "member",
    ("POST", "/v1/containers/{worker_id}/stop"): "member",
    ("POST", "/v1/containers/{worker_id}/exec"): "member",
    ("POST", "/v1/workers/{worker_id}/exec/commands"): "worker",
    ("POST", "/v1/workers/{worker_id}/exec/events"): "worker",
    ("POST", "/v1/sandboxes"): "member",
    ("POST", "/v1/sandboxes/list"): "member",
    ("POST", "/v1/sandboxes/lookup"): "member",
    ("GET", "/v1/sandboxes/{sandbox_id}"): "member",
    ("POST", "/v1/sandboxes/{sandbox_id}/terminate"): "member",
    ("POST", "/v1/sandboxes/{sandbox_id}/tags"): "member",
    ("POST", "/v1/sandboxes/{sandbox_id}/io"): "member",
    ("POST", "/v1/sandboxes/{sandbox_id}/host/commands"): "sandbox",
    ("POST", "/v1/sandboxes/{sandbox_id}/host/events"): "sandbox",
    ("GET", "/v1/secrets/{secret_name}"): "member",
    ("POST", "/v1/secrets/{secret_name}/update"): "member",
    ("POST", "/v1/secrets/{secret_name}/delete"): "member",
    ("POST", "/v1/secrets/{secret_name}/check"): "member",
    ("POST", "/v1/dicts"): "caller",
    ("POST", "/v1/dicts/lookup"): "caller",
    ("GET", "/v1/dicts"): "member",
    ("GET", "/v1/dicts/{dict_id}"): "caller",
    ("POST", "/v1/dicts/{dict_id}/delete"): "caller",
    ("POST", "/v1/dicts/{dict_id}/heartbeat"): "caller",
    ("POST", "/v1/dicts/{dict_id}/get"): "caller",
    ("POST", "/v1/dicts/{dict_id}/put"): "caller",
    ("POST", "/v1/dicts/{dict_id}/pop"): "caller",
    ("POST", "/v1/dicts/{dict_id}/contains"): "caller",
    ("POST", "/v1/dicts/{dict_id}/len"): "caller",
    ("POST", "/v1/dicts/{dict_id}/clear"): "caller",
    ("POST", "/v1/dicts/{dict_id}/scan"): "caller",
    ("POST", "/v1/queues"): "caller",
    ("POST", "/v1/queues/lookup"): "caller",
    ("GET", "/v1/queues"): "member",
    ("GET", "/v1/queues/{queue_id}"): "caller",
    ("POST", "/v1/queues/{queue_id}/delete"): "caller",
    ("POST", "/v1/queues/{queue_id}/heartbeat"): "caller",
    ("POST", "/v1/queues/{queue_id}/put"): "caller",
    ("POST", "/v1/queues/{queue_id}/get"): "caller",
    ("POST", "/v1/queues/{queue_id}/len"): "caller",
    ("POST", "/v1/queues/{queue_id}/clear"): "caller",
    ("POST", "/v1/queues/{queue_id}/peek"): "caller",
    ("POST", "/v1/volumes"): "caller",
    ("GET", "/v1/volumes"): "caller",
    ("GET", "/v1/volumes/{ref}"): "caller",
    ("POST", "/v1/volumes/{ref}/rename"): "caller",
    ("POST", "/v1/volumes/{ref}/delete"): "caller",
    ("POST", "/v1/volumes/{volume_id}/heartbeat"): "caller",
    ("GET", "/v1/volumes/{volume_id}/head"): "caller",
    ("POST", "/v1/volumes/{volume_id}/commit"): "caller",
}


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerHandle, dict[str, str | None], str]]:
    state = tmp_path_factory.mktemp("access")
    handle = start_server(state, f"sqlite:///{state / 'cp.db'}")
    cp = handle.cp
    try:
        with use_server(handle), app.run():
            assert (
                echo.remote(1) == 1
            )  # a real, live worker: its token is the one a compromised VM would hold
            with cp.db.read() as conn:
                wid = conn.execute(
                    select(models.workers.c.id).where(models.workers.c.state == "ready")
                ).scalar_one()
            tokens: dict[str, str | None] = {
                "anonymous": None,
                "owner": handle.token,
                "member": cp.tokens.create("member", "walk"),
                "scoped member": cp.tokens.create("member:other-app", "walk"),
                "worker": cp.tokens.create(f"worker:{wid}", wid),
                "other worker": cp.tokens.create("worker:ta-other", "ta-other"),
            }
            yield handle, tokens, wid
    finally:
        handle.stop()


def _admitted(access: str, identity: str) -> bool:
    kind = {"owner": "owner", "member": "member", "scoped member": "member"}.get(identity, "worker")
    if access == "worker":
        return identity == "worker"  # the worker named in the path, and nobody else
    return kind in ACCESS_KINDS[access]


def test_route_table_declares_the_reviewed_access(
    plane: tuple[ServerHandle, dict[str, str | None], str],
) -> None:
    handle, _, _ = plane
    declared = {(r.method, r.path): r.access for r in handle.api.routes}
    assert declared == EXPECTED


@pytest.mark.parametrize(
    "identity", ["anonymous", "owner", "member", "scoped member", "worker", "other worker"]
)
def test_every_route_enforces_its_access(
    plane: tuple[ServerHandle, dict[str, str | None], str], identity: str
) -> None:
    handle, tokens, wid = plane
    token = tokens[identity]
    headers = {"authorization": f"Bearer {token}"} if token else {}
    ids = {
        "name_or_id": "walk",
        "app_id": "no-such-app",  # not "walk": the walk would stop it (and its worker)
        "function_id": "fu-none",
        "call_id": "fc-none",
        "blob_id": "bl-" + "0" * 40,
        "worker_id": wid,
        "sandbox_id": "sb-none",
        "token_id": "tk-none",
        "secret_name": "no-such-secret",
        "ref": "no-such-volume",
        "volume_id": "vo-none",
        "dict_id": "di-none",
        "queue_id": "qu-none",
    }
    seen = []
    with httpx.Client(base_url=handle.url, headers=headers, timeout=30) as client:
        # a worker that reports itself stopped loses its token: that route goes last
        for route in sorted(handle.api.routes, key=lambda r: r.path.endswith("/stopped")):
            path = route.path.format(**ids)
            # a valid-enough body: what the handler makes of it comes after authorization
            body = b"\xc0" if route.raw_body else msgpack.packb({})
            if route.method == "GET":
                r = client.get(path)
            else:
                r = client.post(path, content=body, headers={"content-type": "application/msgpack"})
            if route.access == "public":
                assert r.status_code == 200, (route.path, r.text)
            elif token is None:
                assert r.status_code == 401, (route.path, identity, r.status_code, r.text)
            elif _admitted(route.access, identity):
                # past authorization: whatever the handler makes of these made-up ids and bodies
                assert r.status_code not in (401, 500), (route.path, identity, r.status_code, r.text)
                if r.status_code == 403:
                    # only an object rule may refuse an admitted identity, and it says which object
                    assert "may not" in r.text, (route.path, identity, r.text)
            else:
                assert r.status_code == 403, (route.path, identity, r.status_code, r.text)
            seen.append(route.path)
    assert len(seen) == len(EXPECTED)


def test_the_walk_would_catch_an_open_route(tmp_path: Path) -> None:
    """Negative control: on a server that lets anonymous loopback in (the old default), the same walk's
    anonymous requests get through, so the 401s above are the server's doing, not the walk's."""
    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", allow_loopback_anonymous=True)
    try:
        assert httpx.get(handle.url + "/v1/apps").status_code == 200
        assert httpx.get(handle.url + "/v1/tokens").status_code == 200
    finally:
        handle.stop()
