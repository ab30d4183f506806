"""Issue 9: a schemathesis run over the OpenAPI document of a live control plane: every operation, with
valid (positive) and schema-violating (negative) requests sent as the owner. No answer may be a server error,
and every answer must come within a timeout (no hangs).

Bodies are msgpack (``application/msgpack``): a serializer for it is registered with schemathesis. Long polls
are not excluded; their wait parameters (``wait``, ``timeout``) are capped at one second before sending, so a
generated 1e9 (which the server would cap at its own long-poll limit, 50 s) does not make the run slow:
what the server does with odd values there (NaN, negative, strings) is still tested. The run is seeded
(``derandomize``) so a failure reproduces."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from security_support import Api, decode, make_app_function_call, owner_token

from cloudmodal.server.app import ServerHandle

EXAMPLES = 10  # per operation, generation mode (positive, negative) and ids (random, real)
ANSWER_WITHIN_S = 15.0  # a long poll answers within its (capped) wait; anything slower is a hang
WAIT_PARAMS = ("wait", "timeout")


def _plain(value: Any) -> Any:
    """Generated data as msgpack can carry it: schemathesis' binary values as bytes, and integers msgpack
    cannot encode (beyond -2**63..2**64-1) as floats, the nearest thing a client could send."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "data") and isinstance(value.data, bytes):
        return value.data
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return float(value)
    return value


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    return msgpack.packb(_plain(value), use_bin_type=True)


def _capped(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return v
    return v if math.isnan(v) or v <= 1.0 else 1.0


def _cap_waits(case: Any) -> None:
    if isinstance(case.body, dict):
        for k in WAIT_PARAMS:
            if k in case.body:
                case.body[k] = _capped(case.body[k])
    if isinstance(case.query, dict):
        for k in WAIT_PARAMS:
            if k in case.query:
                v = case.query[k]
                try:
                    case.query[k] = v if float(v) <= 1.0 or math.isnan(float(v)) else 1
                except (TypeError, ValueError):
                    pass  # not a number: sent as generated


@pytest.fixture(scope="module")
def schema(plane: ServerHandle) -> Any:
    auth = {"authorization": f"Bearer {owner_token(plane)}"}  # in case the document ever needs a token
    raw = httpx.get(plane.url + "/openapi.json", headers=auth, timeout=30).json()
    return schemathesis.openapi.from_dict(raw)


@pytest.fixture(scope="module")
def real_ids(owner: Api) -> dict[str, str]:
    """Ids of objects that exist, for path parameters: random ids mostly stop at a 404, real ones take the
    generated query and body past the look-up. The app is stopped first, so inputs the run sends are refused
    instead of launching workers (reads of it, its function, call and blob still go all the way)."""
    app_id, fid, call_id, _ = make_app_function_call(owner, "sec-fuzz")
    r = owner.http.post("/v1/blobs", content=b"fuzz", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    blob_id = decode(r)["blob_id"]
    assert owner.post(f"/v1/apps/{app_id}/stop").status_code == 200
    return {
        "app_id": app_id,
        "name_or_id": app_id,
        "function_id": fid,
        "call_id": call_id,
        "blob_id": blob_id,
    }


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def test_no_server_errors_and_no_hangs(
    plane: ServerHandle, schema: Any, real_ids: dict[str, str], session: requests.Session
) -> None:
    headers = {"Authorization": f"Bearer {owner_token(plane)}"}
    problems: dict[str, str] = {}
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        label = f"{op.method.upper()} {op.path}"
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        strategies = [op.as_strategy(generation_mode=m) for m in modes]
        names = [p.name for p in op.path_parameters]
        if names and all(n in real_ids for n in names):
            fixed = {n: real_ids[n] for n in names}
            strategies += [op.as_strategy(generation_mode=m, path_parameters=fixed) for m in modes]
        strategy = st.one_of(strategies)

        @settings(
            max_examples=EXAMPLES * len(strategies),
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            _cap_waits(case)
            try:
                response = case.call(
                    base_url=plane.url, session=session, headers=headers, timeout=ANSWER_WITHIN_S
                )
            except requests.Timeout:
                raise AssertionError(
                    f"no answer within {ANSWER_WITHIN_S} s: {case.as_curl_command()}"
                ) from None
            assert response.status_code < 500, (
                f"HTTP {response.status_code} {response.content[:300]!r} for {case.as_curl_command()}"
            )

        try:
            run()
        except AssertionError as e:
            problems[label] = str(e)[:1500]
        assert httpx.get(plane.url + "/healthz", timeout=10).status_code == 200, f"down after {label}"
    assert operations >= 20, f"only {operations} operations in the OpenAPI document"
    assert not problems, "\n\n".join(f"{k}:\n{v}" for k, v in problems.items())
