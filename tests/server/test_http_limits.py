"""The HTTP edge's limits as units: the body budget, msgpack unpacking limits, query parameter bounds, the
OpenAPI document of bounded parameters, and the body caps against what the client and worker send."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgpack
import pytest
from pydantic import Field

from cloudmodal import exception as exc
from cloudmodal.server import api
from cloudmodal.server.limits import INT64_MAX, BodyBudget, BodyError, EdgeLimits, unpack
from cloudmodal.server.router import HTTPError, Route, _coerce, build_docs_app

MiB = 1024 * 1024


def test_body_budget_waits_for_room_then_gives_up() -> None:
    async def scenario() -> None:
        budget = BodyBudget(10, wait_s=0.2)
        await budget.take(8)
        with pytest.raises(TimeoutError):  # no room, and nobody gives any back
            await budget.take(5)
        waiting = asyncio.ensure_future(budget.take(5))
        await asyncio.sleep(0)
        assert not waiting.done()
        budget.give(8)  # room: the waiting body goes ahead
        await asyncio.wait_for(waiting, 5)
        assert budget.used == 5
        await budget.take(3, own=5)  # a growing body is not held up by its own share
        await budget.take(100, own=8)  # nor by the cap, when it is the only body
        assert budget.used == 108
        budget.give(108)
        assert budget.used == 0

    asyncio.run(scenario())


def test_unpack_limits() -> None:
    assert unpack(msgpack.packb({"a": [1, b"x"]})) == {"a": [1, b"x"]}
    with pytest.raises(ValueError):
        unpack(b"\xdd\xff\xff\xff\xff")  # declares 4 billion elements
    with pytest.raises(ValueError):
        unpack(b"\xd4\x05\x00")  # extension types are not part of the protocol
    many = b"\xdc" + (40_000).to_bytes(2, "big") + (b"\xdc\x00\x14" + b"\x90" * 20) * 40_000
    with pytest.raises(BodyError, match="elements"):
        unpack(many)  # 840,000 lists from 1 MiB
    with pytest.raises(ValueError):
        unpack(b"\x91" * 2000 + b"\xc0")  # nested beyond msgpack's stack


def test_query_coercion_bounds() -> None:
    assert _coerce("limit", "10", int, (1, 10)) == 10
    for value, bounds in [("11", (1, 10)), ("0", (1, 10)), (str(2**63), (None, INT64_MAX)), ("1e23", None)]:
        with pytest.raises(HTTPError) as e:
            _coerce("limit", value, int, bounds)
        assert e.value.status == 422 and e.value.detail[0]["loc"] == ["query", "limit"]
    for value in ["nan", "inf", "-inf"]:
        with pytest.raises(HTTPError, match="finite"):
            _coerce("timeout", value, float, (0.0, 10.0))
    for value in ["a\x00", "x" * 1000]:
        with pytest.raises(HTTPError):
            _coerce("name", value, str)


async def bounded(page: Annotated[int, Field(ge=2, le=9)] = 2, limit: int = 5, x: int = 0) -> None:
    """A handler declaring its own bounds."""


def test_routes_bound_their_query_parameters_and_document_it() -> None:
    r = Route("GET", "/v1/things/{thing_id}", "public", bounded)
    assert r.bounds["page"] == (2, 9)  # declared
    assert r.bounds["limit"] == (1, 10_000)  # conventional
    assert r.bounds["x"] == (-(2**63), INT64_MAX)  # what the database holds
    doc = build_docs_app([r], "t").openapi()
    params = {p["name"]: p for p in doc["paths"]["/v1/things/{thing_id}"]["get"]["parameters"]}
    assert params["page"]["schema"]["minimum"] == 2 and params["page"]["schema"]["maximum"] == 9
    assert params["limit"]["schema"]["maximum"] == 10_000
    assert "pattern" in params["thing_id"]["schema"]


def test_body_caps_hold_what_the_client_and_worker_send() -> None:
    """The client's largest bodies fit their routes' caps: a map's input batch (up to MAP_BATCH_BYTES, then
    one more inline input, with msgpack framing and method names) and a function's definition."""
    from cloudmodal.client import calls
    from cloudmodal.server import blobs
    from cloudmodal.worker import runtime

    assert calls.INLINE_LIMIT == blobs.INLINE_LIMIT == runtime.INLINE_LIMIT
    framing = calls.MAP_BATCH_MAX * (16 + 128)  # index, nil or blob id, a method name of up to 128 characters
    assert calls.MAP_BATCH_BYTES + calls.INLINE_LIMIT + framing < api.InputsPut.max_body
    assert calls.MAP_BATCH_MAX <= api.MAX_INPUTS
    assert api.CallCreate.max_body >= calls.INLINE_LIMIT + 4096  # .remote(): one inline input
    assert api.FunctionCreate.max_body > 256 * 64 * 1024  # inline_env at its limits
    assert api.Claim.max_body >= 16 * calls.INLINE_LIMIT  # a claim carries finished outputs
    ok = {"function_id": "fu-x", "inputs": [[0, "predict", b"x" * calls.INLINE_LIMIT, None]]}
    api.InputsPut.model_validate(ok)


def test_edge_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDMODAL_HEADER_TIMEOUT_S", "1.5")
    monkeypatch.setenv("CLOUDMODAL_BODY_BUDGET_BYTES", str(64 * MiB))
    limits = EdgeLimits.from_env()
    assert limits.header_timeout_s == 1.5 and limits.body_budget_bytes == 64 * MiB
    monkeypatch.setenv("CLOUDMODAL_BODY_TIMEOUT_S", "soon")
    with pytest.raises(exc.InvalidError, match="CLOUDMODAL_BODY_TIMEOUT_S"):
        EdgeLimits.from_env()


async def _noop() -> None:
    """A handler for routing tests."""


def test_the_route_index_matches_as_starlettes_router_would() -> None:
    """The table's index finds, for every method and path, the route Starlette's own matching (every route
    in order) finds: table order decides between a literal and a parameter (``lookup`` before
    ``{function_id}`` registered after a templated route of the same length), 405 where only the method
    differs, nothing for an empty segment or a trailing slash."""
    from starlette.routing import Match

    from cloudmodal.server.router import TableApp

    table = [
        Route("GET", "/v1/apps/{name_or_id}", "public", _noop),
        Route("GET", "/v1/functions/lookup", "public", _noop),
        Route("GET", "/v1/functions/{function_id}", "public", _noop),
        Route("POST", "/v1/calls", "public", _noop, websocket=False),
        Route("POST", "/v1/calls/{call_id}/inputs", "public", _noop),
        Route("GET", "/v1/calls/{call_id}", "public", _noop),
        Route("POST", "/v1/workers/{worker_id}/claim", "public", _noop),
    ]
    index = TableApp(table, lambda header, client: api.ANONYMOUS_OWNER, limits=EdgeLimits()).router.routes[0]
    served = index.routes  # type: ignore[attr-defined]

    def linear(scope: dict[str, object]) -> tuple[Match, object]:
        partial: tuple[Match, object] = (Match.NONE, None)
        for route in served:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return match, route
            if match is Match.PARTIAL and partial[0] is Match.NONE:
                partial = match, route
        return partial

    paths = [
        "/v1/functions/lookup",
        "/v1/functions/fu-1",
        "/v1/apps/lookup",
        "/v1/apps/",
        "/v1/apps",
        "/v1/calls",
        "/v1/calls/",
        "/v1/calls/fc-1",
        "/v1/calls/fc-1/inputs",
        "/v1/calls//inputs",
        "/v1/workers/wk-1/claim",
        "/v1/workers/wk-1/claim/",
        "/openapi.json",
        "/docs",
        "/nothing",
        "/",
    ]
    for kind in ("http", "websocket"):
        for method in ("GET", "POST", "HEAD", "DELETE"):
            for path in paths:
                scope: dict[str, object] = {"type": kind, "method": method, "path": path, "root_path": ""}
                match, child = index.matches(scope)
                expected, route = linear(scope)
                assert match is expected, (kind, method, path)
                assert child.get("cloudmodal.route") is route, (kind, method, path)
    lookup = {"type": "http", "method": "GET", "path": "/v1/functions/lookup", "root_path": ""}
    assert index.matches(lookup)[1]["cloudmodal.route"].path == "/v1/functions/lookup"
