"""Bad input at the HTTP edge gets a 4xx naming what is wrong, and the control plane keeps serving: integers
beyond the database's, NaN, ids and names that are no ids or names, msgpack nested or sized to hurt, bodies
over their cap, slow clients; and concurrent large bodies do not multiply the server's memory."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from support import start_server, stop_child
from websockets.sync.client import connect as ws_connect

from cloudmodal.server.app import ServerHandle
from cloudmodal.server.limits import INT32_MAX

MiB = 1024 * 1024


@contextmanager
def _control_plane(tmp_path_factory: pytest.TempPathFactory, **env: str) -> Iterator[ServerHandle]:
    """A control plane built with ``env`` set (its limits are read when it is built)."""
    state = tmp_path_factory.mktemp("edge")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        handle = start_server(state, f"sqlite:///{state / 'cp.db'}")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A control plane with the default client timeouts: a busy machine's stall of a second or two does not
    turn an ordinary request into a 408."""
    with _control_plane(tmp_path_factory) as handle:
        yield handle


@pytest.fixture(scope="module")
def slow_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A control plane with 1 s header and body timeouts, for the tests of those timeouts only."""
    with _control_plane(
        tmp_path_factory, CLOUDMODAL_HEADER_TIMEOUT_S="1", CLOUDMODAL_BODY_TIMEOUT_S="1"
    ) as handle:
        yield handle


def auth(handle: ServerHandle) -> dict[str, str]:
    return {"authorization": f"Bearer {handle.cp.tokens.create('admin', 'test')}"}


def post(handle: ServerHandle, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else msgpack.packb(body, use_bin_type=True)
    return httpx.post(
        handle.url + path,
        content=content,
        headers=auth(handle) | {"content-type": "application/msgpack"},
        timeout=30,
    )


def still_serving(handle: ServerHandle) -> None:
    assert httpx.get(handle.url + "/healthz", timeout=10).status_code == 200


def bad_body(r: httpx.Response, *fields: str) -> str:
    """The error message of a refused body, which names each of ``fields``."""
    assert r.status_code == 400, (r.status_code, r.text[:500])
    message = r.json()["error"]["message"]
    for f in fields:
        assert f in message, (f, message)
    assert len(r.content) < 4000  # the offending value is not echoed back
    return message


def test_query_numbers_beyond_the_database_or_not_finite(edge: ServerHandle) -> None:
    h = auth(edge)
    for path, params in [
        ("/v1/apps", {"limit": "1e23"}),
        ("/v1/apps", {"limit": str(10**30)}),
        ("/v1/apps", {"limit": "-1"}),  # SQLite reads LIMIT -1 as "no limit"; PostgreSQL refuses it
        ("/v1/apps/ap-x/events", {"after": str(2**63)}),
        ("/v1/apps/ap-x/events", {"after": str(INT32_MAX + 1)}),  # row ids are 32-bit on PostgreSQL
        ("/v1/apps/ap-x/logs", {"timeout": "nan"}),
        ("/v1/apps/ap-x/logs", {"timeout": "inf"}),
        ("/v1/functions/lookup", {"name": "f\x00"}),
        ("/v1/functions/lookup", {"name": "f" * 20_000}),
    ]:
        r = httpx.get(edge.url + path, params=params, headers=h, timeout=30)
        assert r.status_code == 422, (path, params, r.status_code, r.text[:300])
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["query", next(iter(params))], (path, detail)
        assert len(r.content) < 2000
    # within range: answered (the app does not exist)
    r = httpx.get(edge.url + "/v1/apps/ap-x/events", params={"after": str(INT32_MAX)}, headers=h)
    assert r.status_code == 404
    still_serving(edge)


def test_path_ids_are_checked_before_anything_looks_them_up(edge: ServerHandle) -> None:
    h = auth(edge)
    for path, name in [
        ("/v1/blobs/bl-" + "a" * 5000, "blob_id"),
        ("/v1/blobs/bl-" + "A" * 40, "blob_id"),
        ("/v1/calls/" + "c" * 5000, "call_id"),
        ("/v1/calls/fc-%00x", "call_id"),
        ("/v1/functions/..fu", "function_id"),
        ("/v1/apps/" + "x" * 20_000, "name_or_id"),
    ]:
        r = httpx.get(edge.url + path, headers=h, timeout=30)
        assert r.status_code == 404, (path[:80], r.status_code, r.text[:300])
        assert f"Invalid {name}" in r.json()["detail"] and len(r.content) < 1000
    still_serving(edge)


def test_body_numbers_beyond_the_database_or_not_finite(edge: ServerHandle) -> None:
    bad_body(post(edge, "/v1/calls/fc-x/outputs", {"after": 2**63}), "after")
    bad_body(post(edge, "/v1/calls/fc-x/outputs", {"limit": 1e23}), "limit")
    bad_body(post(edge, "/v1/calls/fc-x/outputs", {"limit": 0}), "limit")
    bad_body(post(edge, "/v1/calls/fc-x/outputs", {"timeout": float("nan")}), "timeout")
    call = {"call_id": "fc-a", "function_id": "fu-b"}
    bad_body(post(edge, "/v1/calls", call | {"wait": float("nan")}), "wait")
    bad_body(post(edge, "/v1/calls", call | {"wait": float("inf")}), "wait")
    bad_body(post(edge, "/v1/calls", call | {"inputs": [[2**63, None, b"", None]]}), "inputs.0.0")
    bad_body(post(edge, "/v1/calls", call | {"inputs": [[2**64 - 1, None, b"", None]]}), "inputs.0.0")
    bad_body(post(edge, "/v1/calls", call | {"inputs": [[-1, None, b"", None]]}), "inputs.0.0")
    bad_body(post(edge, "/v1/calls", call | {"inputs": [[0, "no such", b"", None]]}), "inputs.0.1")
    bad_body(post(edge, "/v1/calls", call | {"inputs": [[0, None, None, "bl-../../x"]]}), "inputs.0.3")
    bad_body(post(edge, "/v1/calls", call | {"kind": "bogus"}), "kind")
    still_serving(edge)


def test_ids_and_names_are_validated_where_they_enter(edge: ServerHandle) -> None:
    call = {"call_id": "fc-a", "function_id": "fu-b"}
    bad_body(post(edge, "/v1/calls", call | {"call_id": "fc-\x00"}), "call_id")
    bad_body(post(edge, "/v1/calls", call | {"call_id": "x" * 100_000}), "call_id")
    bad_body(post(edge, "/v1/calls", call | {"function_id": "../../fu"}), "function_id")
    bad_body(post(edge, "/v1/apps", {"app_id": "ap-x", "name": "a\x00b"}), "name")
    bad_body(post(edge, "/v1/apps", {"app_id": "ap-x", "name": "n" * 10_000}), "name")
    fn = {"app_id": "ap-x", "name": "f", "spec": {}}
    for field, value in [
        ("source_name", "../../home/user/.bashrc"),
        ("source_name", "a/b.py"),
        ("source_name", ".."),
        ("source_name", "a\x00.py"),
        ("module", "../evil"),
        ("module", "a..b"),
        ("function_id", "fu/../x"),
        ("parent_id", "p" * 129),
        ("source_blob", "bl-" + "0" * 5000),
        ("name", "f/../g"),
        ("inline_env", {"A=B": "x"}),
        ("inline_env", {"A": "x\x00"}),
        ("inline_env", {f"K{i}": "v" for i in range(300)}),
        ("inline_env", {"A": "v" * (65 * 1024)}),
    ]:
        bad_body(post(edge, "/v1/functions", fn | {field: value}), field)
    still_serving(edge)


def test_malformed_and_hostile_msgpack(edge: ServerHandle) -> None:
    nested: Any = {}
    for _ in range(1000):
        nested = {"a": nested}
    fn = {"app_id": "ap-x", "name": "f", "spec": nested}
    assert "nested more than" in bad_body(post(edge, "/v1/functions", fn), "spec")
    deeper = b"\x81\xa4spec" + b"\x91" * 2000 + b"\xc0"  # beyond msgpack's own nesting limit
    assert "not valid msgpack" in bad_body(post(edge, "/v1/functions", None, raw=deeper))
    for raw in [
        b"\xdd\xff\xff\xff\xff",  # an array declaring 4 billion elements
        b"\xdf\xff\xff\xff\xff",  # a map declaring as many
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # bytes declaring 4 GiB
        b"\xc7\x01\x05x",  # an extension type
        b"\x81\x01\x02",  # an integer key
        b"\xc1",  # never used
        b"\xa3abc",  # not a map
    ]:
        assert post(edge, "/v1/calls", None, raw=raw).status_code == 400, raw
    # a large body of small containers: each byte would decode to a 64-byte dict
    many = b"\x81\xa6inputs\xdc" + (50_000).to_bytes(2, "big") + (b"\xdc\x00\x14" + b"\x80" * 20) * 50_000
    assert "elements" in bad_body(post(edge, "/v1/calls", None, raw=many))
    still_serving(edge)


def test_bodies_over_their_cap(edge: ServerHandle) -> None:
    """413 from the declared length, and from a chunked body as it grows past the cap."""
    big = msgpack.packb(
        {"call_id": "fc-a", "function_id": "fu-b", "inputs": [[0, None, b"x" * (17 * MiB), None]]}
    )
    r = post(edge, "/v1/calls", None, raw=big)
    assert r.status_code == 413 and "byte limit" in r.text

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\x00" * MiB

    r = httpx.post(edge.url + "/v1/calls/fc-a/outputs", content=chunks(), headers=auth(edge), timeout=30)
    assert r.status_code == 413 and "byte limit" in r.text
    with ws_connect(edge.url.replace("http://", "ws://") + "/v1/calls", additional_headers=auth(edge)) as ws:
        ws.send(big)
        reply = msgpack.unpackb(ws.recv(timeout=30), raw=False)
        assert reply["status"] == 413 and "byte limit" in reply["error"]["message"]
        ws.send(msgpack.packb({"call_id": "fc-a", "function_id": "fu-missing"}))  # the socket still serves
        assert msgpack.unpackb(ws.recv(timeout=30), raw=False)["status"] == 404
    still_serving(edge)


def _read_until_closed(s: socket.socket, deadline_s: float = 20.0) -> bytes:
    """What the server sends until it closes the connection (fails if it does not within ``deadline_s``)."""
    s.settimeout(deadline_s)
    got = b""
    while True:
        try:
            part = s.recv(65536)
        except ConnectionResetError:
            return got
        if not part:
            return got
        got += part


def _addr(handle: ServerHandle) -> tuple[str, int]:
    host, port = handle.url.removeprefix("http://").split(":")
    return host, int(port)


def test_slow_headers_are_timed_out(slow_edge: ServerHandle) -> None:
    with socket.create_connection(_addr(slow_edge), timeout=10) as s:
        s.sendall(b"GET /heal")  # half a request line, then nothing
        got = _read_until_closed(s)
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), got
    with socket.create_connection(_addr(slow_edge), timeout=10) as s:  # connects and says nothing
        assert _read_until_closed(s) == b""
    still_serving(slow_edge)


def test_keep_alive_outlives_the_header_timeout(slow_edge: ServerHandle) -> None:
    """The header timeout runs from a request's first byte, not between requests: an idle keep-alive
    connection (65 s) is still open after the 1 s header timeout."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {slow_edge.url[7:]}\r\n\r\n".encode()
    with httpx.Client(base_url=slow_edge.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
    with socket.create_connection(_addr(slow_edge), timeout=10) as s:
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)  # the scenario: idle for longer than the header timeout
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_stalled_body_answers_408(slow_edge: ServerHandle) -> None:
    token = auth(slow_edge)["authorization"]
    with socket.create_connection(_addr(slow_edge), timeout=10) as s:
        s.sendall(
            (
                f"POST /v1/calls HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                "Content-Type: application/msgpack\r\nContent-Length: 1000\r\n\r\n"
            ).encode()
            + b"\x80" * 10
        )
        got = _read_until_closed(s)
    assert got.startswith(b"HTTP/1.1 408") and b"stalled" in got, got
    still_serving(slow_edge)


def test_oversized_headers_answer_431(edge: ServerHandle) -> None:
    r = httpx.get(edge.url + "/healthz", headers={"x-filler": "a" * (100 * 1024)}, timeout=10)
    assert r.status_code == 431
    still_serving(edge)


def test_blobs_stream_through_with_their_content_address(edge: ServerHandle) -> None:
    data = os.urandom(5 * MiB + 17)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]

    h = auth(edge)
    r = httpx.post(edge.url + "/v1/blobs", content=chunks(), headers=h, timeout=30)
    assert r.status_code == 200, r.text
    blob_id = msgpack.unpackb(r.content)["blob_id"]
    assert blob_id == "bl-" + hashlib.sha256(data).hexdigest()[:40]
    assert edge.cp.blobs.get(blob_id) == data
    r = httpx.get(edge.url + f"/v1/blobs/{blob_id}", headers=h, timeout=30)
    assert r.status_code == 200 and r.content == data
    r = httpx.head(edge.url + f"/v1/blobs/{blob_id}", headers=h, timeout=30)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(data) and r.content == b""
    r = httpx.post(edge.url + "/v1/blobs", content=b"", headers=h)  # the empty blob is a blob too
    assert msgpack.unpackb(r.content)["blob_id"] == "bl-" + hashlib.sha256(b"").hexdigest()[:40]
    assert not list(edge.cp.blobs.root.glob("**/.tmp-*"))  # no upload left behind


def test_body_budget_makes_large_bodies_wait_then_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the budget held by one stalled body, another large body waits, then answers 503 with
    Retry-After; once the first goes, large bodies are read again."""
    monkeypatch.setenv("CLOUDMODAL_BODY_BUDGET_BYTES", str(4 * MiB))
    monkeypatch.setenv("CLOUDMODAL_BODY_BUDGET_WAIT_S", "0.3")
    monkeypatch.setenv("CLOUDMODAL_BODY_TIMEOUT_S", "60")
    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        h = auth(handle) | {"content-type": "application/msgpack"}
        body = msgpack.packb({"function_id": "fu-x", "inputs": [[0, None, b"x" * (3 * MiB), None]]})
        hog = socket.create_connection(_addr(handle), timeout=10)
        hog.sendall(
            (
                f"POST /v1/calls/fc-x/inputs HTTP/1.1\r\nHost: x\r\nAuthorization: {h['authorization']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[:10]
        )
        deadline = time.monotonic() + 20
        while True:  # until the stalled body holds its share (the server reads it asynchronously)
            r = httpx.post(handle.url + "/v1/calls/fc-x/inputs", content=body, headers=h, timeout=30)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "retry" in r.json()["detail"]
        hog.close()
        deadline = time.monotonic() + 20
        while r.status_code == 503 and time.monotonic() < deadline:
            r = httpx.post(handle.url + "/v1/calls/fc-x/inputs", content=body, headers=h, timeout=30)
        assert r.status_code not in (500, 503), r.text  # read and handled (the call does not exist)
    finally:
        handle.stop()


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_largest_accepted_values_fit_the_database(
    db: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The models' bounds match the columns (PostgreSQL INTEGER is 32-bit): the largest values the models
    accept are stored and used in queries without a database error."""
    import basic

    from cloudmodal.server.api import InputsPut, OutputsGet
    from cloudmodal.server.app import default_settings
    from cloudmodal.server.service import ControlPlane

    url = f"sqlite:///{tmp_path / 'cp.db'}"
    if db == "postgres":
        url = request.getfixturevalue("new_postgres_database")()
    cp = ControlPlane(default_settings(tmp_path, database_url=url))
    try:
        cp.apps.create_app("ap-edge", "edge", True)
        fid = cp.functions.create_function(
            {"app_id": "ap-edge", "name": "f", "spec": basic.square.spec.to_wire()}
        )["function_id"]
        put = InputsPut.model_validate({"function_id": fid, "inputs": [[INT32_MAX, "m", b"", None]]})
        cp.calls.create_call("fc-edge", fid, "map", put.inputs)
        get = OutputsGet.model_validate({"after": INT32_MAX, "limit": 10_000})
        assert cp.queue.fetch_outputs("fc-edge", get.after, get.limit) == []
        assert cp.activity.logs("ap-edge", INT32_MAX, 10_000) == []
        assert cp.activity.events("ap-edge", INT32_MAX, 10_000) == []
        with pytest.raises(ValueError):
            OutputsGet.model_validate({"after": INT32_MAX + 1})
        with pytest.raises(ValueError):
            InputsPut.model_validate({"function_id": fid, "inputs": [[INT32_MAX + 1, None, b"", None]]})
    finally:
        cp.db.dispose()


SERVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {support!r})
from support import start_server
state = Path(sys.argv[1])
handle = start_server(state, f"sqlite:///{{state / 'cp.db'}}")
print(json.dumps({{"url": handle.url, "token": handle.cp.tokens.create("admin", "test")}}), flush=True)
sys.stdin.read()
handle.stop()
"""


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_concurrent_large_bodies_do_not_multiply_memory(tmp_path: Path) -> None:
    """Issue 9's attack, three concurrent 900 MiB chunked bodies, plus three concurrent 256 MiB blob uploads
    and eight concurrent 14 MiB call bodies: the server's peak RSS (VmHWM) grows by less than twice its body
    budget (a body and what it decodes to) and a margin, where it used to hold every body whole."""
    budget = 48 * MiB
    env = os.environ | {"CLOUDMODAL_BODY_BUDGET_BYTES": str(budget), "CLOUDMODAL_BODY_BUDGET_WAIT_S": "30"}
    support = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(support=support), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        url, h = info["url"], {"authorization": f"Bearer {info['token']}"}
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        before = _status_kib(proc.pid, "VmHWM")
        statuses: list[int] = []
        lock = threading.Lock()

        def send(path: str, content: Any) -> None:
            try:
                r = httpx.post(url + path, content=content, headers=h, timeout=120)
                status = r.status_code
            except httpx.TransportError:
                status = -1
            with lock:
                statuses.append(status)

        def chunked(total: int) -> Iterator[bytes]:
            block = b"\x00" * MiB
            for _ in range(total // MiB):
                yield block

        inputs = [[i, None, os.urandom(2 * MiB - 100), None] for i in range(7)]
        call = msgpack.packb({"call_id": "fc-big", "function_id": "fu-none", "inputs": inputs})
        jobs = [("/v1/calls", chunked(900 * MiB)) for _ in range(3)]
        jobs += [("/v1/blobs", chunked(256 * MiB)) for _ in range(3)]
        jobs += [("/v1/calls", call) for _ in range(8)]
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        grown = _status_kib(proc.pid, "VmHWM") - before
        print(f"server VmHWM grew by {grown / 1024:.0f} MiB (budget {budget // MiB} MiB)")
        assert sorted(statuses).count(413) == 3, statuses  # the 900 MiB bodies: over the calls' cap
        assert statuses.count(200) == 3, statuses  # the blobs
        assert statuses.count(404) == 8, statuses  # the calls: read, decoded, their function is missing
        assert grown * 1024 < 2 * budget + 96 * MiB, f"VmHWM grew by {grown} KiB"
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        stop_child(proc, timeout=30)
