"""Web endpoints served through a real control plane: real HTTP (httpx) and WebSocket clients, real worker
processes, every endpoint kind (``fastapi_endpoint``, ``asgi_app``, ``wsgi_app``, ``web_server``, a class's web
method), scaling from zero, streaming and server-sent events, a WebSocket echo, a 100 MB upload that the
control plane does not hold, proxy auth, and a worker killed in the middle of a request.

Streaming is shown without timers: the handler sends its first part and then waits for a file the test
creates only after it has read that part, so a proxy that held the response back would never finish."""

import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from support import start_server, stop_child, use_server

from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from tests.ports import reserved_port

W = models.workers
F = models.functions
E = models.events


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, Path, Any]]:
    marks = tmp_path_factory.mktemp("marks")
    os.environ["WEB_TEST_DIR"] = str(marks)  # the workers inherit it (local provider)
    # the @web_server's port, bound by a worker's http.server only at the first request to it (much later):
    # a reserved port, which nothing else on the machine is handed out meanwhile (tests/ports.py)
    os.environ["WEB_TEST_PORT"] = str(reserved_port())
    os.environ["CLOUDMODAL_WEB_DOMAIN"] = "apps.example.test"  # host routing, read when the server starts
    state = tmp_path_factory.mktemp("cp")
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    try:
        with use_server(handle):
            import web_app

            from cloudmodal.client.session import deploy

            info = deploy(web_app.app)
            yield handle, marks, info
    finally:
        handle.stop()
        for k in ("WEB_TEST_DIR", "WEB_TEST_PORT", "CLOUDMODAL_WEB_DOMAIN"):
            os.environ.pop(k, None)


@pytest.fixture
def client(web: tuple[ServerHandle, Path, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web[0].url, timeout=120) as c:
        yield c


def _live_workers(handle: ServerHandle, function_name: str) -> list[Any]:
    with handle.cp.db.read() as conn:
        fid = conn.execute(select(F.c.id).where(F.c.name == function_name)).scalar_one()
        return conn.execute(
            select(W.c.id, W.c.pid).where(W.c.function_id == fid, W.c.state.in_(["starting", "ready"]))
        ).all()


def _until(cond: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_deploy_prints_the_urls_and_get_web_url_agrees(web: tuple[ServerHandle, Path, Any]) -> None:
    handle, _, info = web
    urls = dict(info["web_endpoints"])
    assert urls["hello"] == f"{handle.url}/web/web-test/hello/"
    assert urls["Greeter.greet"] == f"{handle.url}/web/web-test/greeter-greet/"
    import cloudmodal

    assert cloudmodal.Function.from_name("web-test", "hello").get_web_url() == urls["hello"]
    assert cloudmodal.Cls.from_name("web-test", "Greeter")().greet.get_web_url() == urls["Greeter.greet"]


def test_a_cold_start_from_zero_workers(web: tuple[ServerHandle, Path, Any], client: httpx.Client) -> None:
    handle = web[0]
    assert _live_workers(handle, "hello") == []  # nothing runs before the first request
    r = client.get("/web/web-test/hello/", params={"name": "cold"})
    assert r.status_code == 200, r.text
    assert r.json()["hello"] == "cold"
    assert [w.pid for w in _live_workers(handle, "hello")] == [r.json()["pid"]]


def test_every_endpoint_kind(client: httpx.Client, web: tuple[ServerHandle, Path, Any]) -> None:
    r = client.get("/web/web-test/api/pid")  # asgi_app
    assert r.status_code == 200 and isinstance(r.json()["pid"], int)
    r = client.get("/web/web-test/flask-app/hi", params={"q": "x"})  # wsgi_app, mounted below its prefix
    assert r.json() == {"flask": True, "q": "x", "script_name": "/web/web-test/flask-app"}
    r = client.get("/web/web-test/static-files/")  # web_server: a plain http.server on its own port
    assert r.status_code == 200 and r.text == "<h1>served by http.server</h1>"
    r = client.post(
        "/web/web-test/greeter-greet/", json={"name": "ada"}
    )  # a class's web method, after @enter
    assert r.json() == {"message": "hi ada"}
    r = client.get("/web/web-test/hello")  # the endpoint's root is the path with its slash
    assert r.status_code == 307 and r.headers["location"] == "/web/web-test/hello/"
    r = client.get("/web/web-test/nope/")
    assert r.status_code == 404 and "nope" in r.text
    r = client.get("/web/other-app/hello/")
    assert r.status_code == 404


def test_a_worker_holds_no_more_requests_than_its_capacity(
    client: httpx.Client, web: tuple[ServerHandle, Path, Any]
) -> None:
    """Two requests at once to an endpoint without @concurrent (one request per worker): the second is not
    given to the busy worker; it waits while a second worker starts, and each worker serves one."""
    marks = web[1]
    results: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(client.get("/web/web-test/one-at-a-time/", params={"key": "cap"}))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    _until(lambda: len(list(marks.glob("busy-cap-*"))) == 2, "both requests to run, on two workers")
    (marks / "release-cap").touch()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200, 200]
    assert [r.json()["overlap"] for r in results] == [False, False]
    assert len({r.json()["pid"] for r in results}) == 2


def test_host_routing_under_a_configured_domain(client: httpx.Client) -> None:
    r = client.get("/", params={"name": "by-host"}, headers={"host": "hello--web-test.apps.example.test"})
    assert r.status_code == 200 and r.json()["hello"] == "by-host"
    r = client.get("/pid", headers={"host": "api--web-test.apps.example.test"})
    assert r.status_code == 200 and "pid" in r.json()
    # another host is the API's, as before
    assert client.get("/v1/apps", headers={"host": "elsewhere.example.test"}).status_code == 401


def test_a_custom_domain_routes_to_its_endpoint_and_belongs_to_one_app(client: httpx.Client) -> None:
    import cloudmodal
    from cloudmodal.client.session import deploy
    from cloudmodal.exception import AlreadyExistsError

    r = client.get("/", headers={"host": "hello.example.test"})
    assert r.status_code == 200 and r.json() == {"served": "by its own domain"}
    assert client.get("/v1/apps", headers={"host": "other.example.test"}).status_code == 401  # the API's
    other = cloudmodal.App("web-squatter")
    other.function(serialized=True, name="squat")(
        cloudmodal.fastapi_endpoint(custom_domains=["hello.example.test"])(lambda: {"squatted": True})
    )
    with pytest.raises(AlreadyExistsError, match="hello.example.test"):
        deploy(other)
    r = client.get("/", headers={"host": "hello.example.test"})
    assert r.json() == {"served": "by its own domain"}


def test_a_streaming_response_arrives_part_by_part(
    client: httpx.Client, web: tuple[ServerHandle, Path, Any]
) -> None:
    marks = web[1]
    with client.stream("GET", "/web/web-test/api/stream", params={"key": "stream-go"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == "first"
        (marks / "stream-go").touch()  # the handler sends its second part only now
        assert next(lines) == "second"


def test_server_sent_events_pass_through(client: httpx.Client, web: tuple[ServerHandle, Path, Any]) -> None:
    marks = web[1]
    with client.stream("GET", "/web/web-test/api/sse", params={"key": "sse-go"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = (line for line in r.iter_lines() if line)
        assert next(events) == "data: one"
        (marks / "sse-go").touch()
        assert next(events) == "data: two"


def test_a_websocket_echo(web: tuple[ServerHandle, Path, Any]) -> None:
    from websockets.sync.client import connect

    url = "ws" + web[0].url[4:] + "/web/web-test/api/ws"
    with connect(url, open_timeout=120, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=60) == "echo: hello"
        ws.send(b"\x01\x02\x03")
        assert ws.recv(timeout=60) == b"\x03\x02\x01"
        big = os.urandom(3 << 20)  # several windows' worth, both ways
        ws.send(big)
        assert ws.recv(timeout=60) == big[::-1]


def _reset_peak_rss(pid: int | str = "self") -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def _peak_rss(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


# A control plane of its own, in a process that does nothing else, with the web app deployed: what its peak
# RSS shows is the control plane's alone (not this pytest process's other threads, nor its garbage).
UPLOAD_SERVER = """
import json, sys
from pathlib import Path
sys.path[:0] = [{support!r}, {apps!r}]
from support import start_server, use_server
state = Path(sys.argv[1])
handle = start_server(state, f"sqlite:///{{state / 'cp.db'}}")
with use_server(handle):
    import web_app
    from cloudmodal.client.session import deploy
    deploy(web_app.app)
print(json.dumps({{"url": handle.url}}), flush=True)
sys.stdin.read()
handle.stop()
"""


def test_a_100_mb_upload_does_not_grow_the_control_plane_by_its_size(
    web: tuple[ServerHandle, Path, Any], tmp_path: Path
) -> None:
    """A control plane in a process of its own (the same app deployed to it): its peak resident memory
    during the upload stays far below the upload's size (the body crosses in windows of 1 MiB). The
    negative control shows the measurement sees 100 MB when something does hold it."""
    size, part = 100 << 20, os.urandom(1 << 20)
    expected = hashlib.sha256()
    for _ in range(size // len(part)):
        expected.update(part)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(part)):
            yield part

    here = Path(__file__).parent
    script = UPLOAD_SERVER.format(support=str(here), apps=str(here / "apps"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k not in ("CLOUDMODAL_SERVER_URL", "CLOUDMODAL_TOKEN")}
        | {"WEB_TEST_PORT": str(reserved_port())},  # a port of its own (its static_files never starts)
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"the upload control plane exited with {proc.wait()} before it served"
        url = json.loads(line)["url"]
        with httpx.Client(base_url=url, timeout=120) as c:
            # a worker is up: its start is not part of the measurement
            assert c.get("/web/web-test/api/pid").status_code == 200
            _reset_peak_rss(proc.pid)
            base = _peak_rss(proc.pid)
            r = c.post("/web/web-test/api/upload", content=body())
            grew = _peak_rss(proc.pid) - base
        print(f"the control plane's peak RSS grew by {grew / (1 << 20):.1f} MiB during the upload")
        assert r.status_code == 200, r.text
        assert r.json() == {"bytes": size, "sha256": expected.hexdigest()}
        assert grew < 40 << 20, f"peak RSS grew by {grew >> 20} MiB during a 100 MiB upload"
    finally:
        stop_child(proc)

    gc.collect()  # negative control: holding the body would have shown
    _reset_peak_rss()
    base = _peak_rss()
    held = b"".join(body())
    assert _peak_rss() - base >= 90 << 20
    del held


def test_proxy_auth(client: httpx.Client, web: tuple[ServerHandle, Path, Any]) -> None:
    handle = web[0]
    r = client.post("/web/web-test/private/", json={"a": 1})
    assert r.status_code == 401 and "Modal-Key" in r.text
    owner = client.post(
        "/v1/tokens", headers={"authorization": f"Bearer {handle.token}"}, content=_msgpack({"kind": "proxy"})
    )
    made = _unpack(owner)
    assert made["kind"] == "proxy"
    wrong = {"Modal-Key": made["id"], "Modal-Secret": made["token"] + "x"}
    assert client.post("/web/web-test/private/", json={"a": 1}, headers=wrong).status_code == 401
    as_owner = {"Modal-Key": "tk_owner", "Modal-Secret": handle.token}  # an API token is not a proxy token
    assert client.post("/web/web-test/private/", json={"a": 1}, headers=as_owner).status_code == 401
    good = {"Modal-Key": made["id"], "Modal-Secret": made["token"]}
    r = client.post("/web/web-test/private/", json={"a": 1}, headers=good)
    assert r.status_code == 200, r.text
    assert r.json()["got"] == {"a": 1}
    assert "modal-secret" not in r.json()["headers"] and "modal-key" not in r.json()["headers"]
    # the proxy token opens nothing else
    r = client.get("/v1/apps", headers={"authorization": f"Bearer {made['token']}"})
    assert r.status_code == 403
    # a token scoped to another app is refused here
    other = _unpack(
        client.post(
            "/v1/tokens",
            headers={"authorization": f"Bearer {handle.token}"},
            content=_msgpack({"kind": "proxy", "apps": ["another-app"]}),
        )
    )
    scoped = {"Modal-Key": other["id"], "Modal-Secret": other["token"]}
    assert client.post("/web/web-test/private/", json={"a": 1}, headers=scoped).status_code == 401


def test_a_worker_killed_mid_request(client: httpx.Client, web: tuple[ServerHandle, Path, Any]) -> None:
    """The client of the request in flight gets a clear 502; the next request is served by another worker."""
    marks = web[1]
    got: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: got.setdefault("r", client.get("/web/web-test/api/hang", params={"key": "hang-pid"}))
    )
    t.start()
    pid = int(
        _until(lambda: (marks / "hang-pid").exists() and (marks / "hang-pid").read_text(), "the handler")
    )
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = got["r"]
    assert r.status_code == 502
    assert "stopped before answering" in r.text
    r = client.get("/web/web-test/api/pid")
    assert r.status_code == 200 and r.json()["pid"] != pid


def test_a_request_past_its_functions_timeout_gets_a_504(client: httpx.Client) -> None:
    r = client.get("/web/web-test/too-slow/")
    assert r.status_code == 504 and "timeout (2 s)" in r.text


def test_a_client_that_leaves_cancels_its_handler(web: tuple[ServerHandle, Path, Any]) -> None:
    handle, marks = web[0], web[1]
    host, port = handle.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /web/web-test/api/until-cancelled?key=left HTTP/1.1\r\nHost: x\r\n\r\n")
        _until(lambda: (marks / "started-left").exists(), "the handler to start")
    _until(lambda: (marks / "cancelled-left").exists(), "the handler to be cancelled")


def test_the_tunnel_takes_only_its_workers_token(web: tuple[ServerHandle, Path, Any]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    handle = web[0]
    url = "ws" + handle.url[4:] + "/v1/workers/wk-someone/web"
    for headers, status in (({}, 401), ({"Authorization": f"Bearer {handle.token}"}, 403)):
        with pytest.raises(InvalidStatus) as e:
            connect(url, additional_headers=headers, open_timeout=10)
        assert e.value.response.status_code == status


def _msgpack(body: Any) -> bytes:
    import msgpack

    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(r: httpx.Response) -> Any:
    import msgpack

    assert r.status_code == 200, r.text
    return msgpack.unpackb(r.content, raw=False)
