"""A control plane over TLS with a generated certificate, end to end on this machine: a client that pins it
runs inputs on a real worker process, which dials the control plane over TLS itself (HTTP, its claim
WebSocket, its web tunnel) with the pin it was handed; a client with a wrong pin is refused with the message
that says how to fix it, and the right pin is the control.

The control plane's port speaks only TLS (a plain-HTTP request to it fails: checked), so whatever the worker
did, it did over TLS.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from support import client_env

from cloudmodal import tls
from cloudmodal.client.session import run_app
from cloudmodal.client.transport import Transport
from cloudmodal.exception import ConnectionError
from cloudmodal.providers.local import LocalProvider
from cloudmodal.server.app import ServerHandle, default_settings

TLS_APP = """
import os

import cloudmodal

app = cloudmodal.App("tls-probe")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def where() -> dict:
    from cloudmodal.worker import runtime

    creds = runtime.credentials()
    return {
        "url": creds.url if creds is not None else None,
        "pin": os.environ.get("CLOUDMODAL_TLS_FINGERPRINT"),
        "nested": square.remote(12),  # the worker's own client session, over TLS with the pin
    }


@app.function()
@cloudmodal.fastapi_endpoint()
def hello(name: str = "world") -> dict:
    return {"hello": name}
"""


@pytest.fixture
def tls_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    d = tmp_path / "app"
    d.mkdir()
    (d / "tls_probe.py").write_text(TLS_APP)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("tls_probe", None)
    yield importlib.import_module("tls_probe")
    sys.modules.pop("tls_probe", None)


@pytest.fixture
def tls_plane(tmp_path: Path) -> Iterator[ServerHandle]:
    state = tmp_path / "state"
    cert = tls.self_signed(state, "127.0.0.1")
    settings = default_settings(
        state,
        database_url=f"sqlite:///{state / 'cloudmodal.db'}",
        lease_s=6.0,
        heartbeat_s=0.5,
        worker_timeout_s=10.0,
        reconcile_interval_s=0.1,
    )
    provider = LocalProvider(state_dir=state / "workers", gpus=[], standby=False)
    handle = ServerHandle(settings, providers={"local": provider}, tls=cert).start_in_thread()
    try:
        yield handle
    finally:
        handle.stop()


def test_a_pinned_client_and_its_worker_run_inputs_over_tls(
    tls_plane: ServerHandle, tls_app: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp = tls_plane.tls_fingerprint
    assert fp is not None and tls_plane.url.startswith("https://")
    # The port speaks only TLS: plain HTTP gets nowhere (so the worker below can only have used TLS).
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_plane.url.replace("https://", "http://") + "/healthz", timeout=5)
    monkeypatch.setenv("CLOUDMODAL_TLS_FINGERPRINT", tls.display_fingerprint(fp))  # colons: as people paste
    with client_env(tls_plane.url, tls_plane.token), run_app(tls_app.app, show_logs=False):
        seen = tls_app.where.remote()
        squares = list(tls_app.square.map(range(6)))
        web_url = tls_app.hello.get_web_url()
        with httpx.Client(verify=tls.httpx_verify(web_url, fp), timeout=60) as c:
            page = c.get(web_url, params={"name": "tls"})  # through the worker's web tunnel (wss://)
    assert squares == [0, 1, 4, 9, 16, 25]
    # the worker's pin is the one the control plane handed it (lowercase hex), not this process's (colons)
    assert seen["url"].startswith("https://") and seen["pin"] == fp and seen["nested"] == 144
    assert web_url.startswith("https://")
    assert page.status_code == 200 and page.json() == {"hello": "tls"}, page.text


def test_a_wrong_pin_is_refused_with_both_fingerprints_and_the_fix(tls_plane: ServerHandle) -> None:
    fp = tls_plane.tls_fingerprint
    assert fp is not None
    wrong = ("0" if fp[0] != "0" else "1") + fp[1:]  # one digit off
    t = Transport(tls_plane.url, tls_plane.token, fingerprint=wrong, reconnect_timeout=60)
    try:
        with pytest.raises(tls.TlsPinError) as err:  # at once: a wrong certificate is never retried
            t.get("/v1/apps", all=False)
        with pytest.raises(tls.TlsPinError):  # the WebSocket channel pins the same way
            t.channel("/v1/apps/none/heartbeat").call({})
    finally:
        t.close()
    msg = str(err.value)
    assert isinstance(err.value, ConnectionError)
    assert tls.display_fingerprint(fp) in msg and tls.display_fingerprint(wrong) in msg
    assert f"cloudmodal login https://127.0.0.1:{tls_plane.port} --fingerprint {fp}" in msg
    # The control: the same request with the right pin is answered.
    ok = Transport(tls_plane.url, tls_plane.token, fingerprint=fp, reconnect_timeout=10)
    try:
        assert isinstance(ok.get("/v1/apps", all=False), list)
    finally:
        ok.close()


def test_a_wrong_pin_in_the_environment_stops_a_client_session(
    tls_plane: ServerHandle, tls_app: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLOUDMODAL_TLS_FINGERPRINT is what the client session pins: a wrong one fails the app's start."""
    monkeypatch.setenv("CLOUDMODAL_TLS_FINGERPRINT", "ab" * 32)
    with client_env(tls_plane.url, tls_plane.token):
        with pytest.raises(tls.TlsPinError):
            with run_app(tls_app.app, show_logs=False):
                pass
