"""The control plane's HTTP surface, over real HTTP: routing, query parameters, authentication (tokens beyond
anonymous loopback, worker scopes, WebSockets), body limits, the OpenAPI document, and what a control plane
imports to start (the lean start-up a cold ``cloudmodal run`` depends on)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from support import start_server
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from cloudmodal.server.app import ServerHandle
from cloudmodal.server.blobs import MAX_BLOB_SIZE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A control plane that refuses anonymous requests, even from loopback (as one beyond loopback does)."""
    state = tmp_path_factory.mktemp("locked")
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}", allow_loopback_anonymous=False)
    try:
        yield handle
    finally:
        handle.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_openapi_documents_every_route(locked: ServerHandle) -> None:
    r = httpx.get(locked.url + "/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["info"]["title"] == "cloudmodal control plane"
    table = locked.api.routes
    assert len(table) >= 25
    for route in table:
        op = doc["paths"][route.path][route.method.lower()]
        if route.body is not None:
            schema = op["requestBody"]["content"]["application/msgpack"]["schema"]
            assert set(route.body.model_fields) <= set(schema["properties"]), route.path
        documented = {p["name"]: p["in"] for p in op.get("parameters", [])}
        for name in (s[1:-1] for s in route.segments if s.startswith("{")):
            assert documented.get(name) == "path", (route.path, name)
        for name in route.query:
            assert documented.get(name) == "query", (route.path, name)
        assert bool(op.get("security")) == (route.access != "public"), route.path
    logs = doc["paths"]["/v1/apps/{app_id}/logs"]["get"]
    assert {p["name"] for p in logs["parameters"]} == {"app_id", "after", "timeout", "limit"}
    docs = httpx.get(locked.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_read_routes_answer_what_their_documented_row_models_declare(tmp_path: Path) -> None:
    """A read route's OpenAPI response is the table model its rows come from, and what it answers carries only
    fields that model declares (docs and answers cannot drift apart)."""
    from cloudmodal.server import models

    locked = start_server(tmp_path, f"sqlite:///{tmp_path / 'cloudmodal.db'}", allow_loopback_anonymous=False)
    try:
        _check_read_models(locked, models)
    finally:
        locked.stop()


def _check_read_models(locked: ServerHandle, models: Any) -> None:
    doc = httpx.get(locked.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def documented(path: str) -> set[str]:
        content = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/msgpack"]["schema"]
        ref = (content.get("items") or content)["$ref"].rsplit("/", 1)[-1]
        return set(schemas[ref]["properties"])

    h = bearer(locked.cp.tokens.create("admin", "test"))
    app = {"app_id": "ap-docs", "name": "docs"}
    httpx.post(locked.url + "/v1/apps", content=msgpack.packb(app), headers=h).raise_for_status()
    locked.cp.activity.event("test.kind", "something happened", app_id="ap-docs", n=1)
    events = msgpack.unpackb(httpx.get(locked.url + "/v1/apps/ap-docs/events", headers=h).content)
    assert events and set(events[0]) <= documented("/v1/apps/{app_id}/events") == set(
        models.Event.model_fields
    )
    history = msgpack.unpackb(httpx.get(locked.url + "/v1/apps/ap-docs/history", headers=h).content)
    assert documented("/v1/apps/{name_or_id}/history") == set(models.Deployment.model_fields)
    assert all(set(row) <= set(models.Deployment.model_fields) for row in history)
    assert documented("/v1/apps/{app_id}/logs") == set(models.Log.model_fields)
    assert documented("/v1/calls/{call_id}") == set(models.Call.model_fields)


def test_routing_and_query_errors(locked: ServerHandle) -> None:
    h = bearer(locked.cp.tokens.create("admin", "test"))
    r = httpx.get(locked.url + "/v1/nothing-here", headers=h)
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = httpx.get(locked.url + "/v1/calls", headers=h)  # the path exists for POST only
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
    r = httpx.get(locked.url + "/v1/apps/", headers=h)  # not redirected to /v1/apps
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = httpx.get(locked.url + "/v1/apps", params={"limit": "many"}, headers=h)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]
    r = httpx.get(locked.url + "/v1/functions/lookup", headers=h)  # `name` is required
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "missing"
    r = httpx.get(locked.url + "/v1/apps", params={"all": "false", "limit": "5"}, headers=h)
    assert r.status_code == 200 and msgpack.unpackb(r.content) == []
    r = httpx.get(locked.url + "/v1/apps/no-such-app", headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = httpx.head(locked.url + "/healthz")  # HEAD is GET without the body
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0


def test_tokens_are_required_and_scoped(locked: ServerHandle) -> None:
    url = locked.url
    r = httpx.get(url + "/v1/apps")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert httpx.get(url + "/v1/apps", headers=bearer("cm_not-a-token")).status_code == 401
    admin = locked.cp.tokens.create("admin", "test")
    assert httpx.get(url + "/v1/apps", headers=bearer(admin)).status_code == 200
    worker = locked.cp.tokens.create("worker:ta-one", "test")
    r = httpx.get(url + "/v1/apps", headers=bearer(worker))  # a worker's token is not an admin's
    assert r.status_code == 403
    r = httpx.post(url + "/v1/workers/ta-two/ready", headers=bearer(worker))  # nor another worker's
    assert r.status_code == 403 and "another worker" in r.json()["detail"]
    r = httpx.post(url + "/v1/workers/ta-one/ready", headers=bearer(worker))  # its own: past auth
    assert r.status_code not in (401, 403)
    locked.cp.tokens.revoke_scope("worker:ta-one")
    assert httpx.post(url + "/v1/workers/ta-one/ready", headers=bearer(worker)).status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200  # liveness stays public


def test_websocket_routes_authenticate_at_the_handshake(locked: ServerHandle) -> None:
    ws_url = locked.url.replace("http://", "ws://")
    with pytest.raises(InvalidStatus) as e:
        ws_connect(ws_url + "/v1/calls").close()
    assert e.value.response.status_code == 401
    admin = locked.cp.tokens.create("admin", "test")
    with ws_connect(ws_url + "/v1/calls", additional_headers=bearer(admin)) as ws:
        body = {"call_id": "ca-x", "function_id": "fu-missing", "inputs": [[0, None, b"", None]], "wait": 1.0}
        ws.send(msgpack.packb(body, use_bin_type=True))
        reply = msgpack.unpackb(ws.recv(timeout=10), raw=False)
        assert reply["status"] == 404 and reply["error"]["type"] == "NotFoundError"
        ws.send(b"\xc1garbage")  # a bad message gets an error reply; the socket stays open
        reply = msgpack.unpackb(ws.recv(timeout=10), raw=False)
        assert reply["status"] == 400 and "Bad request body" in reply["error"]["message"]
    for path in ("/v1/apps", "/v1/nothing-here"):  # not a WebSocket route; no route at all
        with pytest.raises(InvalidStatus) as e:
            ws_connect(ws_url + path, additional_headers=bearer(admin)).close()
        assert e.value.response.status_code == 404
        assert json.loads(e.value.response.body or b"{}") == {"detail": "Not Found"}, path
    with pytest.raises(InvalidStatus) as e:  # an id that cannot exist: refused before authentication
        ws_connect(ws_url + "/v1/workers/..wk/claim").close()
    assert e.value.response.status_code == 404 and b"Invalid worker_id" in (e.value.response.body or b"")


def test_blob_over_the_limit_is_refused_from_its_header(locked: ServerHandle) -> None:
    """413 before a byte of the body is read: the server does not buffer an oversized upload."""
    admin = locked.cp.tokens.create("admin", "test")
    host, port = locked.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/blobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {admin}\r\n"
                f"Content-Length: {MAX_BLOB_SIZE + 1}\r\n\r\n"
            ).encode()
        )
        head = s.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head
    assert "byte limit" in head


LEAN_START = textwrap.dedent(
    """
    import json, sys
    import cloudmodal
    from cloudmodal.client.session import run_app

    app = cloudmodal.App("lean")

    @app.function()
    def double(x):
        return 2 * x

    if __name__ == "__main__":
        with run_app(app, show_logs=False) as running:
            result = double.remote(21)
            heavy = ["fastapi", "alembic", "sqlalchemy.dialects.postgresql", "pynvml"]
            loaded = [m for m in heavy if m in sys.modules]
            import httpx
            url = running.session.transport.url
            openapi = httpx.get(url + "/openapi.json").status_code
            print(json.dumps({"result": result, "loaded": loaded, "openapi": openapi,
                              "fastapi_after": "fastapi" in sys.modules}))
    """
)


def test_embedded_start_imports_no_web_framework_or_migration_tool(tmp_path: Path) -> None:
    """A cold start pays for what it uses: the embedded control plane serves its first call without
    importing FastAPI, alembic (a new database needs no migration), the PostgreSQL dialect or NVML;
    ``/openapi.json`` still works (built then)."""
    script = tmp_path / "lean.py"
    script.write_text(LEAN_START)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"result": 42, "loaded": [], "openapi": 200, "fastapi_after": True}


def test_stopping_answers_long_polls_instead_of_waiting_them_out(tmp_path: Path) -> None:
    """A long poll in flight (here 50 s of an app's logs) is answered, empty, when the server stops: the
    shutdown does not wait out its timeout (a stopped embedded control plane frees its process at once)."""
    import threading

    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cloudmodal.db'}")
    app = {"app_id": "ap-poll", "name": "poll"}
    httpx.post(
        handle.url + "/v1/apps", content=msgpack.packb(app), headers=bearer(handle.token)
    ).raise_for_status()
    answers: list[httpx.Response] = []
    in_flight = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=120, headers=bearer(handle.token)) as c:
            in_flight.set()
            answers.append(c.get(handle.url + "/v1/apps/ap-poll/logs", params={"timeout": 50}))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    in_flight.wait(60)
    deadline = time.monotonic() + 60
    while not handle.cp.hub._waiters and time.monotonic() < deadline:  # the poll is parked on the server
        threading.Event().wait(0.05)
    assert handle.cp.hub._waiters, "the long poll never reached the server"
    handle.stop()
    t.join(20)  # far less than the poll's 50 s
    assert not t.is_alive()
    assert answers[0].status_code == 200 and msgpack.unpackb(answers[0].content) == []


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (where a client's requests come from it)."""
    for probe in ("10.255.255.255", "192.168.255.255", "8.8.8.8"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((probe, 9))  # UDP: no packet is sent, this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    return None


def test_loopback_clients_need_a_token_by_default(tmp_path: Path) -> None:
    """No anonymous access by default, loopback included: another local user (or a same-host proxy) would
    otherwise be the owner. The explicit opt-in lets loopback in (the control that this test would see the
    old default)."""
    handle = start_server(tmp_path / "default", f"sqlite:///{tmp_path / 'default.db'}")
    try:
        assert not handle.settings.allow_loopback_anonymous
        r = httpx.get(handle.url + "/v1/apps")
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"], r.text
        assert httpx.get(handle.url + "/v1/apps", headers=bearer(handle.token)).status_code == 200
        assert httpx.get(handle.url + "/healthz").status_code == 200  # liveness stays public
    finally:
        handle.stop()
    opted_in = start_server(
        tmp_path / "open", f"sqlite:///{tmp_path / 'open.db'}", allow_loopback_anonymous=True
    )
    try:
        assert httpx.get(opted_in.url + "/v1/apps").status_code == 200
    finally:
        opted_in.stop()


def test_anonymous_loopback_does_not_extend_beyond_loopback(tmp_path: Path) -> None:
    """Where anonymous loopback is allowed (an explicit opt-in), a client reaching the server on another
    address (here: this machine's own non-loopback address) still needs a token."""
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    from cloudmodal.server.app import default_settings

    handle = ServerHandle(
        default_settings(
            tmp_path, database_url=f"sqlite:///{tmp_path / 'cloudmodal.db'}", allow_loopback_anonymous=True
        ),
        host=addr,
    ).start_in_thread()
    try:
        assert handle.settings.allow_loopback_anonymous
        r = httpx.get(handle.url + "/v1/apps")
        assert r.status_code == 401, r.text
        token = handle.cp.tokens.create("admin", "test")
        assert httpx.get(handle.url + "/v1/apps", headers=bearer(token)).status_code == 200
        assert httpx.get(handle.url + "/healthz").status_code == 200
    finally:
        handle.stop()


def test_stop_without_waiting_still_shuts_the_server_down(tmp_path: Path) -> None:
    """``stop(wait=False)`` (an embedded control plane whose client is done) returns once the reconciler is
    stopped; the server then finishes its shutdown on its own thread and closes its socket and database."""
    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cloudmodal.db'}")
    assert httpx.get(handle.url + "/healthz").status_code == 200
    thread = handle._thread
    assert thread is not None
    handle.stop(wait=False)
    thread.join(20)
    assert not thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "/healthz", timeout=2)
    assert handle.sock.fileno() == -1  # closed by the server thread itself
