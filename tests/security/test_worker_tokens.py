"""Issue 9, points 2 and 3: what a compromised worker can do with its token. Real control plane, real worker
processes; the attacker's token is minted the way the reconciler mints one for the worker it launches
(``worker:<id>``), for a live worker of another function, which is what a compromised worker VM holds.

Point 2: it answered another worker's input with a forged pickle, which the caller then unpickled (code run on
the caller's machine). Point 3: it passed every "any" route: other apps' function rows with their inline
secrets, other calls' outputs, any blob, creating functions, minting tokens, listing apps.

Negative controls: the legitimate worker's real output is accepted and is what the caller gets; the owner
token succeeds on each request the worker token is refused; and the worker's own routes (register: its own
function's spec; claim; heartbeat; its own source) keep working with its token."""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sec_tenant
import sec_victim
from security_support import (
    Api,
    as_client,
    decode,
    held_input,
    live_worker_of,
    mint_worker_token,
    owner_token,
)

from cloudmodal.client.session import run_app
from cloudmodal.ids import new_id
from cloudmodal.serialization import serialize_args
from cloudmodal.server.app import ServerHandle


@pytest.fixture(scope="module")
def apps(plane: ServerHandle) -> Iterator[None]:
    with as_client(plane.url, owner_token(plane)):
        with run_app(sec_victim.app, show_logs=False), run_app(sec_tenant.app, show_logs=False):
            yield


class _RunsOnUnpickle:
    """A "result" whose unpickling runs code: it creates ``marker`` (a harmless stand-in for anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# -- point 2 --------------------------------------------------------------------------------------------
def test_a_worker_token_cannot_answer_another_worker_s_input(
    plane: ServerHandle, owner: Api, apps: None, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    marker = tmp_path / "forged-result-was-unpickled"
    assert sec_victim.ping.remote(1) == 1
    attacker = live_worker_of(plane, sec_victim.ping._function_id)["id"]
    call = sec_victim.hold.spawn(str(release))
    input_id, holder = held_input(plane, call.object_id)  # a real worker holds it, blocked until released
    assert holder != attacker

    try:
        forged = pickle.dumps(_RunsOnUnpickle(marker), protocol=4)
        row = [input_id, "success", forged, None, -1, False]
        evil = Api(plane.url, mint_worker_token(plane, attacker))
        try:
            # every route that records outputs, under the attacker's own worker id ...
            answers = {
                "outputs": evil.post(f"/v1/workers/{attacker}/outputs", {"outputs": [row]}),
                "claim": evil.post(f"/v1/workers/{attacker}/claim", {"max": 1, "wait": 0, "outputs": [row]}),
                # ... and under the holder's id, with the attacker's token
                "as holder": evil.post(f"/v1/workers/{holder}/outputs", {"outputs": [row]}),
            }
        finally:
            evil.close()
        recorded = decode(owner.post(f"/v1/calls/{call.object_id}/outputs", {"after": 0, "timeout": 0}))
    finally:
        release.touch()  # the holder answers now (and never blocks past this test)
    assert all(r.status_code < 500 for r in answers.values()), {k: r.text for k, r in answers.items()}
    assert answers["as holder"].status_code == 403

    # negative control: the worker that holds the input answers it, and the caller gets its real result
    result = call.get(timeout=120)
    assert not marker.exists(), "the caller unpickled the forged result: code ran on the caller's machine"
    assert result == "real:release"
    # refused or ignored: either way nothing had been recorded for the call before its worker answered
    assert recorded["outputs"] == [], "a forged output was recorded for another worker's input"


# -- point 3 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Another app's objects, and a live worker (of the victim app) whose token attacks them."""

    app_id: str
    function_id: str
    source_blob: str
    call_id: str
    worker_id: str
    worker_token: str
    worker_pid: int | None
    worker_host: str
    own_function_id: str
    own_source_blob: str
    spec: dict[str, Any]


@pytest.fixture(scope="module")
def target(plane: ServerHandle, owner: Api, apps: None) -> Target:
    call = sec_tenant.secret_digest.spawn()
    # the tenant's worker sees its secret (so it is there to be stolen from the function row)
    assert call.get(timeout=120) == hashlib.sha256(sec_tenant.SECRET_VALUE.encode()).hexdigest()
    fid = sec_tenant.secret_digest._function_id
    row = plane.cp.functions.function_row(
        fid
    )  # from the database: the API need not show anyone the source blob
    assert sec_victim.ping.remote(2) == 2
    own_fid = sec_victim.ping._function_id
    worker = live_worker_of(plane, own_fid)
    own = plane.cp.functions.function_row(own_fid)
    assert row["source_blob"] and own["source_blob"] and row["source_blob"] != own["source_blob"]
    return Target(
        app_id=row["app_id"],
        function_id=fid,
        source_blob=row["source_blob"],
        call_id=call.object_id,
        worker_id=worker["id"],
        worker_token=mint_worker_token(plane, worker["id"]),
        worker_pid=worker["pid"],
        worker_host=worker["host"] or socket.gethostname(),
        own_function_id=own_fid,
        own_source_blob=own["source_blob"],
        spec=sec_victim.ping.spec.to_wire(),
    )


Request = Callable[[Api, Target], Any]
FORBIDDEN: dict[str, Request] = {
    "another app's function row": lambda a, t: a.get(f"/v1/functions/{t.function_id}"),
    "another app's function by lookup": lambda a, t: a.get(
        "/v1/functions/lookup", name="secret_digest", app_id=t.app_id
    ),
    "another call's outputs": lambda a, t: a.post(
        f"/v1/calls/{t.call_id}/outputs", {"after": 0, "timeout": 0}
    ),
    "another call's progress": lambda a, t: a.get(f"/v1/calls/{t.call_id}"),
    "cancel another call": lambda a, t: a.post(f"/v1/calls/{t.call_id}/cancel"),
    "another app's shipped source": lambda a, t: a.get(f"/v1/blobs/{t.source_blob}"),
    "a function in another app": lambda a, t: a.post(
        "/v1/functions",
        {"app_id": t.app_id, "name": f"planted_{new_id('x')[2:8]}", "spec": t.spec, "module": "sec_victim"},
    ),
    "a call to another (not deployed) app": lambda a, t: a.post(
        "/v1/calls",
        {
            "call_id": new_id("fc"),
            "function_id": t.function_id,
            "kind": "spawn",
            "inputs": [[0, None, serialize_args((), {}), None]],
        },
    ),
    "mint a token": lambda a, t: a.post("/v1/tokens", {"kind": "owner", "apps": None, "name": "by a worker"}),
    "list apps": lambda a, t: a.get("/v1/apps"),
    "another app's logs": lambda a, t: a.get(f"/v1/apps/{t.app_id}/logs"),
    "another app's events": lambda a, t: a.get(f"/v1/apps/{t.app_id}/events"),
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_a_worker_token_is_refused_outside_its_own_work(
    what: str, plane: ServerHandle, owner: Api, target: Target
) -> None:
    worker = Api(plane.url, target.worker_token)
    try:
        r = FORBIDDEN[what](worker, target)
    finally:
        worker.close()
    assert r.status_code in (403, 404), f"{what}: HTTP {r.status_code} {r.content[:300]!r}"
    assert sec_tenant.SECRET_VALUE.encode() not in r.content
    # negative control: the owner's token, the same request, answered
    r = FORBIDDEN[what](owner, target)
    assert r.status_code == 200, f"{what} (owner): HTTP {r.status_code} {r.content[:300]!r}"


def test_a_worker_token_still_does_its_own_work(plane: ServerHandle, target: Target) -> None:
    """The negative control for the refusals: the worker's own routes answer its token."""
    wid = target.worker_id
    worker = Api(plane.url, target.worker_token)
    try:
        r = worker.post(f"/v1/workers/{wid}/register", {"pid": target.worker_pid, "host": target.worker_host})
        assert r.status_code == 200, r.text
        defn = decode(r)
        assert defn["id"] == target.own_function_id and defn["spec"]["name"] == "ping"
        r = worker.post(f"/v1/workers/{wid}/heartbeat", {"in_flight": 0, "idle": True, "held": []})
        assert r.status_code == 200, r.text
        r = worker.post(f"/v1/workers/{wid}/claim", {"max": 1, "wait": 0})
        assert r.status_code == 200, r.text
        assert decode(r)["inputs"] == []
        r = worker.get(f"/v1/blobs/{target.own_source_blob}")
        assert r.status_code == 200 and r.content, r.text
    finally:
        worker.close()
