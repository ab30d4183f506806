"""Web endpoints of every kind, for tests/integration/test_web.py and bench/web.py.

``WEB_TEST_DIR`` (a directory both the test and the workers see) is where the handlers leave marks and wait for
the test's; ``WEB_TEST_PORT`` is the ``@web_server``'s port (set before import, inherited by the workers)."""

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from fastapi import Request

import cloudmodal

app = cloudmodal.App("web-test")
MARKS = Path(os.environ.get("WEB_TEST_DIR", "/tmp"))
PORT = int(os.environ.get("WEB_TEST_PORT", "8765"))


async def _wait_for(name: str) -> None:
    """Until the test creates ``MARKS/name`` (how a handler knows the test saw what it sent so far)."""
    while not (MARKS / name).exists():
        await asyncio.sleep(0.02)


@app.function()
@cloudmodal.fastapi_endpoint()
def hello(name: str = "world") -> dict[str, object]:
    return {"hello": name, "pid": os.getpid()}


@app.function()
@cloudmodal.fastapi_endpoint(method="POST", requires_proxy_auth=True)
def private(item: dict, request: Request) -> dict[str, object]:  # type: ignore[type-arg]
    return {"got": item, "headers": sorted(request.headers.keys())}


@app.function()
@cloudmodal.fastapi_endpoint()
async def one_at_a_time(key: str) -> dict[str, object]:
    """Marks ``busy-KEY-PID`` while it runs; finding its mark taken means two requests ran at once on one
    worker, which the default capacity (one input per container) forbids."""
    try:
        os.close(os.open(MARKS / f"busy-{key}-{os.getpid()}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return {"overlap": True, "pid": os.getpid()}
    await _wait_for(f"release-{key}")
    return {"overlap": False, "pid": os.getpid()}


@app.function()
@cloudmodal.fastapi_endpoint(custom_domains=["hello.example.test"])
def branded() -> dict[str, str]:
    return {"served": "by its own domain"}


@app.function(timeout=2)
@cloudmodal.fastapi_endpoint()
async def too_slow() -> dict[str, bool]:
    await asyncio.sleep(3600)  # past its function's timeout: the caller gets a 504
    return {"answered": True}


@app.function()
@cloudmodal.concurrent(max_inputs=8)
@cloudmodal.asgi_app()
def api():  # type: ignore[no-untyped-def]
    from fastapi import FastAPI, WebSocket
    from fastapi.responses import StreamingResponse

    web = FastAPI()

    @web.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @web.get("/stream")
    async def stream(key: str) -> StreamingResponse:
        async def parts():  # type: ignore[no-untyped-def]
            yield b"first\n"
            await _wait_for(key)  # only once the test has read "first": the proxy did not hold it back
            yield b"second\n"

        return StreamingResponse(parts(), media_type="text/plain")

    @web.get("/sse")
    async def sse(key: str) -> StreamingResponse:
        async def events():  # type: ignore[no-untyped-def]
            yield "data: one\n\n"
            await _wait_for(key)
            yield "data: two\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @web.post("/upload")
    async def upload(request: Request) -> dict[str, object]:
        h, n = hashlib.sha256(), 0
        async for part in request.stream():
            h.update(part)
            n += len(part)
        return {"bytes": n, "sha256": h.hexdigest()}

    @web.get("/hang")
    async def hang(key: str) -> dict[str, int]:
        (MARKS / key).write_text(str(os.getpid()))  # the test kills this worker now
        await asyncio.sleep(3600)
        return {"pid": os.getpid()}

    @web.get("/until-cancelled")
    async def until_cancelled(key: str) -> dict[str, int]:
        (MARKS / f"started-{key}").touch()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            (MARKS / f"cancelled-{key}").touch()  # the client left: its handler was cancelled
            raise
        return {"pid": os.getpid()}

    @web.websocket("/ws")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await ws.send_text("echo: " + message["text"])
            else:
                await ws.send_bytes(message["bytes"][::-1])

    return web


@app.function()
@cloudmodal.wsgi_app()
def flask_app():  # type: ignore[no-untyped-def]
    from flask import Flask, request

    web = Flask(__name__)

    @web.route("/hi")
    def hi() -> dict[str, object]:
        return {"flask": True, "q": request.args.get("q"), "script_name": request.script_root}

    return web


@app.function()
@cloudmodal.web_server(PORT, startup_timeout=60)
def static_files() -> None:
    """``PORT`` is bound only now, long after the test picked it: the test picks it with
    tests/ports.py's ``reserved_port`` (a port nothing else on the machine is handed out meanwhile). Its
    errors (a port in use after all) go to ``MARKS/http-server.log``."""
    (MARKS / "static").mkdir(exist_ok=True)
    (MARKS / "static" / "index.html").write_text("<h1>served by http.server</h1>")
    with open(MARKS / "http-server.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "http.server", str(PORT), "--bind", "127.0.0.1"],
            cwd=MARKS / "static",
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


@app.cls()
class Greeter:
    @cloudmodal.enter()
    def setup(self) -> None:
        self.greeting = "hi"

    @cloudmodal.fastapi_endpoint(method="POST")
    def greet(self, body: dict) -> dict[str, str]:  # type: ignore[type-arg]
        return {"message": f"{self.greeting} {body['name']}"}
