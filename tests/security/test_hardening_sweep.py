"""Issue 9, point 6 ("also observed"), as a compact sweep against one real control plane: a revoked token
stops working within seconds on a second control plane sharing the database and on an already-open WebSocket;
unknown ids answer 404 (not 200); inputs for calls that do not exist and deployments of missing apps answer 404;
a client-chosen function id already taken answers 409; out-of-range integers, NaN waits, oversized and
hostile ids, deeply nested msgpack answer a 4xx; the control plane answers ``/healthz`` after each.

(Each case in detail is tested per route elsewhere; this is the attacker's checklist, in one table.)

Negative controls: the revoked token worked on both before its revocation, and another token still works
after; every sweep request is sent with the owner token, so a 4xx is about the input, not about access."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from security_support import Api, decode, make_app_function_call, owner_token, until
from support import start_server

from cloudmodal.client.transport import Transport
from cloudmodal.exception import AuthError, NotFoundError
from cloudmodal.ids import new_id
from cloudmodal.server.app import ServerHandle


# -- revocation -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_planes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, ServerHandle]]:
    state = tmp_path_factory.mktemp("sec-two")
    url = f"sqlite:///{state / 'shared.db'}"
    shared = {"blob_dir": state / "blobs"}  # control planes sharing a database share its blob store
    a = start_server(state / "a", url, **shared)
    try:
        b = start_server(state / "b", url, **shared)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _mint_member(owner: Api, name: str) -> tuple[str, str]:
    r = owner.post("/v1/tokens", {"kind": "member", "apps": None, "name": name})
    assert r.status_code == 200, r.text
    got = decode(r)
    return got["id"], got["token"]


def _channel_accepts(channel: Any) -> bool | None:
    """Whether an open WebSocket still serves requests with its token: True (served: an unknown function is
    a 404), False (refused), None (something else)."""
    try:
        channel.call({"call_id": new_id("fc"), "function_id": new_id("fu"), "kind": "remote"})
    except NotFoundError:
        return True
    except AuthError:
        return False
    return None


def test_a_revoked_token_stops_working_everywhere_within_seconds(
    two_planes: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = two_planes
    owner_a = Api(a.url, owner_token(a))
    token_id, token = _mint_member(owner_a, "to be revoked")
    _, other = _mint_member(owner_a, "stays")
    on_b = Api(b.url, token)
    channels = {h.url: Transport(h.url, token, reconnect_timeout=2).channel("/v1/calls") for h in (a, b)}
    try:
        # negative control: the token works on the other control plane and over both open WebSockets
        assert on_b.get("/v1/apps").status_code == 200
        assert [_channel_accepts(ch) for ch in channels.values()] == [True, True]

        assert owner_a.post(f"/v1/tokens/{token_id}/revoke").status_code == 200
        assert until(lambda: on_b.get("/v1/apps").status_code == 401, 20), "still accepted by the other plane"
        for url, ch in channels.items():
            assert until(lambda ch=ch: _channel_accepts(ch) is False, 20), (
                f"an open WebSocket to {url} still serves it"
            )
        # the other control plane still serves a token that was not revoked
        assert Api(b.url, other).get("/v1/apps").status_code == 200
    finally:
        for ch in channels.values():
            ch.close()
        on_b.close()
        owner_a.close()


# -- the sweep ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Known:
    app_id: str
    function_id: str
    call_id: str
    spec: dict[str, Any]


@pytest.fixture(scope="module")
def known(owner: Api) -> Known:
    """An app, a function and a call (no inputs: nothing runs) for the cases that need real ids."""
    app_id, fid, call_id, spec = make_app_function_call(owner, "sec-sweep")
    return Known(app_id, fid, call_id, spec)


def _fn(k: Known, **over: Any) -> dict[str, Any]:
    return {
        "app_id": k.app_id,
        "name": "f_" + new_id("x")[2:10],
        "spec": k.spec,
        "module": "sec_victim",
    } | over


BIG = 2**63  # one past int64
NAN = math.nan
Send = Callable[[Api, Known], httpx.Response]
CASES: dict[str, tuple[int | None, Send]] = {
    # unknown ids: 404, never 200
    "unknown app": (404, lambda o, k: o.get(f"/v1/apps/{new_id('ap')}")),
    "unknown app's history": (404, lambda o, k: o.get(f"/v1/apps/{new_id('ap')}/history")),
    "unknown app's events": (404, lambda o, k: o.get(f"/v1/apps/{new_id('ap')}/events")),
    "unknown app's logs": (404, lambda o, k: o.get(f"/v1/apps/{new_id('ap')}/logs")),
    "unknown app's heartbeat": (404, lambda o, k: o.post(f"/v1/apps/{new_id('ap')}/heartbeat")),
    "stop an unknown app": (404, lambda o, k: o.post(f"/v1/apps/{new_id('ap')}/stop")),
    "unknown function": (404, lambda o, k: o.get(f"/v1/functions/{new_id('fu')}")),
    "unknown call": (404, lambda o, k: o.get(f"/v1/calls/{new_id('fc')}")),
    "unknown call's outputs": (404, lambda o, k: o.post(f"/v1/calls/{new_id('fc')}/outputs", {"timeout": 0})),
    "cancel an unknown call": (404, lambda o, k: o.post(f"/v1/calls/{new_id('fc')}/cancel")),
    "unknown blob": (404, lambda o, k: o.get("/v1/blobs/bl-" + "0" * 40)),
    "revoke an unknown token": (404, lambda o, k: o.post(f"/v1/tokens/{new_id('tk')}/revoke")),
    # writes naming things that do not exist
    "inputs for a call that does not exist": (
        404,
        lambda o, k: o.post(
            f"/v1/calls/{new_id('fc')}/inputs",
            {"function_id": k.function_id, "inputs": [[0, None, b"x", None]]},
        ),
    ),
    "deployment of a missing app": (
        404,
        lambda o, k: o.post(f"/v1/apps/{new_id('ap')}/deployments", {"functions": []}),
    ),
    "a function id already taken": (
        409,
        lambda o, k: o.post("/v1/functions", _fn(k, function_id=k.function_id)),
    ),
    # integers beyond int64
    "limit=1e23": (None, lambda o, k: o.get("/v1/apps", limit="1e23")),
    "limit=10**23": (None, lambda o, k: o.get("/v1/apps", limit=str(10**23))),
    "events after=2**63": (None, lambda o, k: o.get(f"/v1/apps/{k.app_id}/events", after=str(BIG))),
    "logs after=2**63": (None, lambda o, k: o.get(f"/v1/apps/{k.app_id}/logs", after=str(BIG))),
    "outputs after=2**63": (None, lambda o, k: o.post(f"/v1/calls/{k.call_id}/outputs", {"after": BIG})),
    "outputs limit=2**63": (
        None,
        lambda o, k: o.post(f"/v1/calls/{k.call_id}/outputs", {"after": 1, "limit": BIG}),
    ),
    "input index 2**63": (
        None,
        lambda o, k: o.post(
            f"/v1/calls/{k.call_id}/inputs",
            {"function_id": k.function_id, "inputs": [[BIG, None, b"x", None]]},
        ),
    ),
    # NaN waits
    "outputs timeout=NaN": (None, lambda o, k: o.post(f"/v1/calls/{k.call_id}/outputs", {"timeout": NAN})),
    "logs timeout=nan": (None, lambda o, k: o.get(f"/v1/apps/{k.app_id}/logs", timeout="nan")),
    "call wait=NaN": (
        None,
        lambda o, k: o.post(
            "/v1/calls",
            {
                "call_id": new_id("fc"),
                "function_id": k.function_id,
                "wait": NAN,
                "inputs": [[0, None, b"x", None]],
            },
        ),
    ),
    # hostile ids and names
    "5,000-character blob id": (None, lambda o, k: o.get("/v1/blobs/bl-" + "a" * 5000)),
    "msgpack nested 1,000 deep": (
        None,
        lambda o, k: o.http.post(
            "/v1/apps", content=b"\x91" * 1000 + b"\xc0", headers={"content-type": "application/msgpack"}
        ),
    ),
    "app id with NUL": (None, lambda o, k: o.post("/v1/apps", {"app_id": "ap-a\x00b", "name": "nul"})),
    "app id ../": (None, lambda o, k: o.post("/v1/apps", {"app_id": "../../etc", "name": "dots"})),
    "app id of 100 kB": (
        None,
        lambda o, k: o.post("/v1/apps", {"app_id": "ap-" + "a" * 100_000, "name": "big"}),
    ),
    "app name with NUL": (None, lambda o, k: o.post("/v1/apps", {"app_id": new_id("ap"), "name": "a\x00b"})),
    "app name of 100 kB": (
        None,
        lambda o, k: o.post("/v1/apps", {"app_id": new_id("ap"), "name": "a" * 100_000}),
    ),
    "function name ../": (None, lambda o, k: o.post("/v1/functions", _fn(k, name="../../x"))),
    "function id with NUL": (None, lambda o, k: o.post("/v1/functions", _fn(k, function_id="fu-a\x00b"))),
    "source_name ../": (
        None,
        lambda o, k: o.post("/v1/functions", _fn(k, source_name="../../../tmp/planted.py")),
    ),
    "call id ../": (
        None,
        lambda o, k: o.post("/v1/calls", {"call_id": "../../x", "function_id": k.function_id, "inputs": []}),
    ),
    "call id of 100 kB": (
        None,
        lambda o, k: o.post(
            "/v1/calls", {"call_id": "fc-" + "a" * 100_000, "function_id": k.function_id, "inputs": []}
        ),
    ),
    "call id with NUL in the path": (None, lambda o, k: o.get("/v1/calls/fc-a%00b")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(
    case: str, plane: ServerHandle, owner: Api, known: Known
) -> None:
    want, send = CASES[case]
    r = send(owner, known)
    if want is None:
        assert 400 <= r.status_code < 500 and r.status_code not in (401, 403), (
            f"{case}: HTTP {r.status_code} {r.content[:300]!r}"
        )
    else:
        assert r.status_code == want, f"{case}: HTTP {r.status_code}, expected {want}: {r.content[:300]!r}"
    assert r.content, f"{case}: an error without a message"
    assert httpx.get(plane.url + "/healthz", timeout=10).status_code == 200
