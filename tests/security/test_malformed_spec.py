"""Issue 9, point 4: one malformed spec stopped the reconciler for every app. ``POST /v1/functions`` took
``autoscaler.min_containers="1"`` (every reconciler tick then failed with a TypeError, and other apps' calls
hung), ``max_inputs=0`` and ``max_containers=-1``. Each must be refused with a 4xx naming the field, and
another app's call must still complete afterwards.

Negative control: the very same body with the valid spec is accepted, so the refusals are about the fields."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import sec_victim
from security_support import Api, as_client, decode, owner_token

from cloudmodal.client.session import run_app
from cloudmodal.ids import new_id
from cloudmodal.serialization import serialize_args
from cloudmodal.server.app import ServerHandle


def _set(path: tuple[str, str], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(spec: dict[str, Any]) -> None:
        section, key = path
        spec[section] = dict(spec.get(section) or {}) | {key: value}

    return apply


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "min_containers": _set(("autoscaler", "min_containers"), "1"),
    "max_inputs": _set(("concurrency", "max_inputs"), 0),
    "max_containers": _set(("autoscaler", "max_containers"), -1),
}


def test_a_malformed_spec_is_refused_and_stops_nobody_else(plane: ServerHandle, owner: Api) -> None:
    app_id = new_id("ap")
    assert (
        owner.post("/v1/apps", {"app_id": app_id, "name": "sec-malformed", "ephemeral": False}).status_code
        == 200
    )
    valid = sec_victim.ping.spec.to_wire()

    def body(spec: dict[str, Any], name: str) -> dict[str, Any]:
        return {"app_id": app_id, "name": name, "spec": spec, "module": "sec_victim"}

    answers = {}
    for field, corrupt in MALFORMED.items():
        spec = copy.deepcopy(valid)
        corrupt(spec)
        r = owner.post("/v1/functions", body(spec, f"bad_{field}"))
        answers[field] = (r.status_code, r.text)
        if r.status_code == 200:
            # accepted (the old behaviour): give its pool work, as an attacker would, so the reconciler acts on it
            fid = decode(r)["function_id"]
            owner.post(
                "/v1/calls",
                {
                    "call_id": new_id("fc"),
                    "function_id": fid,
                    "kind": "spawn",
                    "inputs": [[0, None, serialize_args((0,), {}), None]],
                },
            )

    # another app's call completes: the reconciler still launches its worker
    with as_client(plane.url, owner_token(plane)), run_app(sec_victim.app, show_logs=False):
        call = sec_victim.ping.spawn(7)
        try:
            result = call.get(timeout=90)
        except TimeoutError:
            result = "hung"
    assert result == 7, "another app's call did not complete after a malformed spec was posted"

    for field, (status, text) in answers.items():
        assert 400 <= status < 500 and status not in (401, 403), f"{field}: HTTP {status} {text[:300]}"
        assert field in text, f"the error for {field} does not name the field: {text[:300]}"

    # negative control: the same body with the valid spec is accepted
    r = owner.post("/v1/functions", body(copy.deepcopy(valid), "good"))
    assert r.status_code == 200, r.text
    assert owner.get("/healthz").status_code == 200
