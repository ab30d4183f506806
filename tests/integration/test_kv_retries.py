"""Queue and Dict requests retried after the control plane committed them but before the answer arrived:
each happens once (a put stores once, a get or pop returns the same values once and loses none).

A real TCP proxy sits between the client and a real control plane (SQLite and PostgreSQL). Armed, it forwards
the next request and, when the control plane's answer comes back (so the transaction has committed), drops the
answer and cuts the connection: the client's transport reconnects and sends the request again, as it does when
a control plane restarts. Negative controls: the same request sent twice over raw HTTP without a request id
does duplicate (put) or lose (get, pop) values, which is what the ids prevent."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
from support import client_env

from cloudmodal.dict import Dict
from cloudmodal.queue import Queue
from cloudmodal.server import svc_kv
from cloudmodal.server.app import ServerHandle


class CuttingProxy:
    """A TCP proxy to ``upstream``. :meth:`arm` makes it drop the next answer: on the first connection that
    carries client bytes after arming, the first upstream bytes that follow are discarded and both sides
    closed. ``cuts`` counts the answers dropped, ``connections`` the connections accepted."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.armed = False
        self.victim: socket.socket | None = None  # the connection whose next answer is dropped
        self.cuts = 0
        self.connections = 0
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self) -> None:
        with self.lock:
            self.armed, self.victim = True, None

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        """Client -> control plane: forwarded; the first bytes after arming mark this connection."""
        try:
            while data := client.recv(65536):
                with self.lock:
                    if self.armed and self.victim is None:
                        self.victim = client
                server.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        """Control plane -> client: forwarded, except the marked connection's answer (dropped, then cut)."""
        try:
            while data := server.recv(65536):
                with self.lock:
                    cut = self.armed and self.victim is client
                    if cut:
                        self.armed, self.victim = False, None
                        self.cuts += 1
                if cut:
                    break  # the answer goes nowhere: the control plane committed, the client never hears
                client.sendall(data)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self.closing = True
        self.listener.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture
def proxied(control_plane: ServerHandle) -> Iterator[CuttingProxy]:
    """This process's client talks to ``control_plane`` through a :class:`CuttingProxy`."""
    proxy = CuttingProxy(control_plane.port)
    try:
        with client_env(proxy.url, control_plane.token):
            yield proxy
    finally:
        proxy.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_retried_put_and_get_happen_once(control_plane: ServerHandle, proxied: CuttingProxy) -> None:
    q = Queue.from_name(_name("retry"), create_if_missing=True)
    # open the put and get channels first: the armed cut is then the answer to the request itself
    q.put("warm-up")
    assert q.get(block=False) == "warm-up"

    before = proxied.connections
    proxied.arm()
    q.put("once")
    assert proxied.cuts == 1, "the proxy did not drop the put's answer: the test would prove nothing"
    assert proxied.connections > before, "the client did not reconnect to send the put again"
    assert q.len() == 1, "the retried put stored its value again"

    q.put_many(["a", "b", "c"], partition="p")
    proxied.arm()
    q.put_many(["d", "e"], partition="p")
    assert proxied.cuts == 2
    assert q.len(partition="p") == 5

    proxied.arm()
    assert q.get(timeout=10) == "once", "the retried get did not return the value the first attempt took"
    assert proxied.cuts == 3
    assert q.len() == 0 and q.get(block=False) is None  # taken once: not still there, not lost

    proxied.arm()
    assert q.get_many(3, partition="p", timeout=10) == ["a", "b", "c"]
    assert proxied.cuts == 4
    assert q.get_many(10, partition="p", block=False) == ["d", "e"]


def test_retried_pop_and_skip_if_exists_answer_once(
    control_plane: ServerHandle, proxied: CuttingProxy
) -> None:
    d = Dict.from_name(_name("retry"), create_if_missing=True)
    d["warm-up"] = 1
    assert d.pop("warm-up") == 1
    d.put("k", "v")

    proxied.arm()
    assert d.pop("k") == "v", "the retried pop lost the value the first attempt removed"
    assert proxied.cuts == 1
    assert "k" not in d

    proxied.arm()
    assert d.put("new", 1, skip_if_exists=True) is True, "the retried put answered as if it had not written"
    assert proxied.cuts == 2
    assert d.put("new", 2, skip_if_exists=True) is False and d["new"] == 1


# -- the same request twice over raw HTTP: with and without an id --------------------------------------------
def _post(handle: ServerHandle, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(
        handle.url + path,
        content=msgpack.packb(body, use_bin_type=True),
        headers={"authorization": f"Bearer {handle.token}", "content-type": "application/msgpack"},
    )
    r.raise_for_status()
    return msgpack.unpackb(r.content, raw=False)


def test_a_request_sent_twice_without_an_id_duplicates_and_loses(control_plane: ServerHandle) -> None:
    """The negative control: what the ids prevent happens without them."""
    h = control_plane
    qid = _post(h, "/v1/queues", {})["id"]
    put = {"values": [b"x"], "partition": ""}
    _post(h, f"/v1/queues/{qid}/put", put)
    _post(h, f"/v1/queues/{qid}/put", put)
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 2  # duplicated
    rid = uuid.uuid4().hex
    _post(h, f"/v1/queues/{qid}/put", put | {"request_id": rid})
    _post(h, f"/v1/queues/{qid}/put", put | {"request_id": rid})
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 3  # once

    _post(h, f"/v1/queues/{qid}/clear", {})
    _post(h, f"/v1/queues/{qid}/put", {"values": [b"a", b"b", b"c", b"d"]})
    get = {"n": 1}
    assert _post(h, f"/v1/queues/{qid}/get", get)["values"] == [b"a"]
    assert _post(h, f"/v1/queues/{qid}/get", get)["values"] == [b"b"]  # the first answer's "a" is lost
    rid = uuid.uuid4().hex
    assert _post(h, f"/v1/queues/{qid}/get", get | {"request_id": rid})["values"] == [b"c"]
    assert _post(h, f"/v1/queues/{qid}/get", get | {"request_id": rid})["values"] == [b"c"]
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 1  # "d" is still there: the retry took nothing

    did = _post(h, "/v1/dicts", {})["id"]
    _post(h, f"/v1/dicts/{did}/put", {"entries": [[b"k", b"v"], [b"j", b"w"]]})
    assert _post(h, f"/v1/dicts/{did}/pop", {"key": b"k"})["value"] == b"v"
    assert _post(h, f"/v1/dicts/{did}/pop", {"key": b"k"})["value"] is None  # the value is lost
    rid = uuid.uuid4().hex
    assert _post(h, f"/v1/dicts/{did}/pop", {"key": b"j", "request_id": rid})["value"] == b"w"
    assert _post(h, f"/v1/dicts/{did}/pop", {"key": b"j", "request_id": rid})["value"] == b"w"

    # an id is never reused for another operation: refused, not answered with the other's answer
    again = {"entries": [[b"k", b"v"]], "skip_if_exists": True, "request_id": rid}  # rid: the pop's above
    r = httpx.post(
        h.url + f"/v1/dicts/{did}/put",
        content=msgpack.packb(again),
        headers={"authorization": f"Bearer {h.token}", "content-type": "application/msgpack"},
    )
    assert r.status_code == 400 and "already used" in r.text, r.text


def test_racing_attempts_of_one_get_take_once(control_plane: ServerHandle) -> None:
    """Attempts of one request arriving together (the first still running when the retry comes): every one
    answers the same values, and only those are taken."""
    h = control_plane
    qid = _post(h, "/v1/queues", {})["id"]
    _post(h, f"/v1/queues/{qid}/put", {"values": [str(i).encode() for i in range(40)]})
    for _ in range(10):
        rid = uuid.uuid4().hex
        answers: list[Any] = []
        go = threading.Barrier(4)

        def attempt(rid: str = rid, go: threading.Barrier = go, answers: list[Any] = answers) -> None:
            go.wait()
            answers.append(_post(h, f"/v1/queues/{qid}/get", {"n": 2, "request_id": rid})["values"])

        threads = [threading.Thread(target=attempt) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(answers) == 4 and all(a == answers[0] for a in answers) and len(answers[0]) == 2, answers
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 20


def test_recorded_answers_are_pruned_after_ten_minutes(control_plane: ServerHandle) -> None:
    h = control_plane
    qid = _post(h, "/v1/queues", {"name": _name("pruned")})["id"]  # named: pruning keeps it
    rid = uuid.uuid4().hex
    put = {"values": [b"x"], "request_id": rid}
    _post(h, f"/v1/queues/{qid}/put", put)
    svc_kv.prune(h.cp, now=time.time() + svc_kv.REQUEST_KEEP_S / 2)  # younger than the bound: kept
    _post(h, f"/v1/queues/{qid}/put", put)
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 1
    assert svc_kv.prune(h.cp, now=time.time() + svc_kv.REQUEST_KEEP_S + 1) >= 1
    _post(h, f"/v1/queues/{qid}/put", put)  # forgotten: the same id is a new request now
    assert _post(h, f"/v1/queues/{qid}/len", {})["len"] == 2
