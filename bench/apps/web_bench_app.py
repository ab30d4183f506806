"""The web bench's app (``bench/web.py``): one FastAPI app, served through the control plane's proxy as an
``@asgi_app`` with ``@concurrent(max_inputs=100)``, and by uvicorn directly (:func:`make_app`)."""

from __future__ import annotations

import os
from typing import Any

import cloudmodal

app = cloudmodal.App("web-bench")

BIG = b"x" * (64 * 1024)  # the body of /big: 64 KiB


def make_app() -> Any:
    """The FastAPI app both targets serve: ``/ping`` (a tiny JSON answer) and ``/big`` (64 KiB of bytes)."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    web = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @web.get("/ping")
    async def ping() -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    @web.get("/big")
    async def big() -> Response:
        return Response(BIG, media_type="application/octet-stream")

    return web


@app.function()
@cloudmodal.concurrent(max_inputs=100)
@cloudmodal.asgi_app()
def api() -> Any:
    return make_app()
