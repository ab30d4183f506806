"""Bad input gets a clear error, loses nothing, and the control plane keeps serving."""

from __future__ import annotations

import os

import basic
import broken_app
import gpu_app
import pytest

from cloudmodal.client.session import run_app
from cloudmodal.exception import ExecutionError, NoProviderError, NotFoundError, RequestSizeError


@pytest.fixture(scope="module")
def app(control_plane):
    with run_app(basic.app, show_logs=False) as running:
        yield running


def test_payload_over_the_limit(app, monkeypatch):
    monkeypatch.setenv("CLOUDMODAL_MAX_PAYLOAD_BYTES", str(1024 * 1024))
    with pytest.raises(RequestSizeError, match="limit is 1048576 bytes"):
        basic.echo_bytes.remote(b"x" * (2 * 1024 * 1024))
    assert basic.square.remote(4) == 16


def test_unknown_app_and_function(app):
    import cloudmodal

    with pytest.raises(NotFoundError, match="No deployed app named 'nope'"):
        cloudmodal.Function.from_name("nope", "f").remote()
    with pytest.raises(NotFoundError, match="not found"):
        cloudmodal.FunctionCall.from_id("fc-doesnotexist").get(timeout=1)
    assert basic.square.remote(5) == 25


def test_gpu_no_provider_has(control_plane, monkeypatch):
    monkeypatch.delenv("CLOUDMODAL_FAKE_GPUS", raising=False)
    with pytest.raises(NoProviderError) as info:
        with run_app(gpu_app.app, show_logs=False):
            pass
    msg = str(info.value)
    assert "gpu='H100, A100-80GB:2'" in msg and "--gpu-fallback cpu" in msg and "enable a cloud" in msg


def test_gpu_cpu_fallback_opt_in(control_plane):
    with run_app(gpu_app.app, show_logs=False, gpu_fallback="cpu"):
        assert gpu_app.on_gpu.remote(21) == (42, "")


def test_worker_that_cannot_start_fails_inputs_instead_of_hanging(control_plane):
    with run_app(broken_app.app, show_logs=False):
        with pytest.raises(ExecutionError, match="failed to start.*cannot be imported inside a worker"):
            broken_app.f.remote(1)


def test_control_plane_rejects_garbage(control_plane):
    import httpx

    auth = {"authorization": f"Bearer {control_plane.token}"}
    r = httpx.post(control_plane.url + "/v1/calls", content=b"\xc1not-msgpack", headers=auth)
    assert r.status_code == 400 and "Bad request body" in r.text
    r = httpx.post(control_plane.url + "/v1/calls", content=b"\x80", headers=auth)  # missing fields
    assert r.status_code == 400
    assert httpx.get(control_plane.url + "/healthz").status_code == 200


def test_token_required_beyond_loopback_and_hashed(control_plane):
    from sqlalchemy import text

    token = control_plane.cp.tokens.create("admin", "test")
    with control_plane.cp.db.read() as conn:
        stored = [r[0] for r in conn.execute(text("select token_hash from token"))]
    assert token not in stored and all(len(h) == 64 for h in stored)
    who = control_plane.cp.tokens.identify(token)
    assert who is not None and who.kind == "owner"  # the legacy "admin" scope reads as the owner
    assert control_plane.cp.tokens.identify("cm_wrong") is None


_ = os
