"""``/openapi.json`` and ``/docs``: a FastAPI application generated from the route table, built on first use.

Its endpoints are never called (the table is served by :class:`cloudmodal.server.router.TableApp`); FastAPI
is only the schema generator, so the document cannot disagree with what is served: path parameters with
their id patterns, query parameters with their bounds, msgpack request bodies from each route's model, bearer
authentication wherever a route is not public. FastAPI is imported when the document is first asked for,
never on a control plane's start.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import TYPE_CHECKING, Any

from cloudmodal.server.limits import MAX_QUERY_STR

if TYPE_CHECKING:
    from cloudmodal.server.router import Route

MSGPACK = "application/msgpack"


def build_docs_app(routes: list[Route], title: str) -> Any:
    """A FastAPI application whose OpenAPI schema documents ``routes``: path and query parameters from each
    handler's signature, msgpack request bodies from its model, bearer authentication where required."""
    from fastapi import Depends, FastAPI, Path, Query
    from fastapi.security import HTTPBearer

    from cloudmodal.server.limits import BLOB_ID_PATTERN, ID_PATTERN
    from cloudmodal.server.router import scalar

    app = FastAPI(title=title, version="1", docs_url="/docs", redoc_url=None)
    bearer = HTTPBearer(auto_error=False, description="`cloudmodal server token`")
    for r in routes:
        hints = typing.get_type_hints(r.handler)
        params = []
        for name in r.path_params:
            pattern = BLOB_ID_PATTERN if name == "blob_id" else ID_PATTERN
            annotation: Any = typing.Annotated[hints.get(name, str), Path(pattern=pattern)]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
        for name, (typ, default) in r.query.items():
            low, high = r.bounds.get(name, (None, None))
            if scalar(typ) is str:
                query = Query(max_length=MAX_QUERY_STR, pattern=r"^[^\x00-\x1f\x7f]*$")
            else:
                query = (
                    Query(ge=low, le=high, allow_inf_nan=False)
                    if scalar(typ) is float
                    else Query(ge=low, le=high)
                )
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=typing.Annotated[typ, query],
                )
            )

        async def endpoint(**_: Any) -> None:
            raise RuntimeError("served by cloudmodal.server.router.TableApp")

        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        endpoint.__name__ = r.handler.__name__
        endpoint.__doc__ = r.handler.__doc__
        extra: dict[str, Any] = {}
        if r.body is not None:
            schema = r.body.model_json_schema(ref_template="#/components/schemas/{model}")
            extra["requestBody"] = {"content": {MSGPACK: {"schema": schema}}, "required": True}
        elif r.raw_body:
            extra["requestBody"] = {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                "required": True,
            }
        if r.websocket:
            extra["x-websocket"] = "also served as a WebSocket: each binary message a body, each reply {ok}"
        app.add_api_route(
            r.path,
            endpoint,
            methods=[r.method],
            openapi_extra=extra or None,
            dependencies=[] if r.access == "public" else [Depends(bearer)],
            response_class=_response_class(),
            response_model=r.response,
            description=(inspect.getdoc(r.handler) or "") + f"\n\nAccess: {r.access}.",
        )
    return app


@functools.cache
def _response_class() -> Any:
    from fastapi.responses import JSONResponse

    # A JSONResponse subclass only so that FastAPI documents the route's response model; the answers are
    # msgpack, sent by the router, never by this class.
    class MsgpackResponse(JSONResponse):
        media_type = MSGPACK

    return MsgpackResponse
