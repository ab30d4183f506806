"""Running or deploying an app that declares features nothing implements yet (a function's startup_timeout)
fails before the control plane hears of it; CLOUDMODAL_ALLOW_INERT=1 runs it anyway with a warning, the
features ignored."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from support import start_server, use_server

from cloudmodal.client.session import current_session, run_app
from cloudmodal.client.unsupported import ALLOW_ENV, InertFeatureWarning
from cloudmodal.exception import InvalidError
from cloudmodal.server.app import ServerHandle

INERT_APP = """
import cloudmodal

app = cloudmodal.App("inert-probe")


@app.function(schedule=cloudmodal.Period(hours=1), startup_timeout=60)
def tick(x: int = 2) -> int:
    return x * 3


@app.function(secrets=[cloudmodal.Secret.from_dict({"MODE": "prod"})])
def load() -> str:
    return "loaded"


@app.function()
@cloudmodal.fastapi_endpoint(method="POST")
def hello(name: str = "world") -> str:
    return f"hello {name}"


@app.cls()
class Model:
    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x

    @cloudmodal.asgi_app()
    def api(self):
        return None
"""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("cp")
    handle = start_server(state, f"sqlite:///{state / 'cloudmodal.db'}")
    try:
        with use_server(handle):
            yield handle
    finally:
        handle.stop()


@pytest.fixture
def inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    (tmp_path / "inert_probe.py").write_text(INERT_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("inert_probe", None)
    yield importlib.import_module("inert_probe")
    sys.modules.pop("inert_probe", None)


def _app_names() -> list[str]:
    return [a["name"] for a in current_session().transport.get("/v1/apps", all=True)]


def test_run_and_deploy_are_refused_before_anything_is_registered(plane: ServerHandle, inert: ModuleType):
    before = _app_names()
    with pytest.raises(InvalidError) as info:
        with run_app(inert.app, show_logs=False):
            pytest.fail("the app must not start")
    msg = str(info.value)
    assert msg.startswith("Cannot run app 'inert-probe': it declares features that are not implemented yet")
    assert "  - tick: startup_timeout=60: it is not enforced yet" in msg
    assert "fastapi_endpoint" not in msg and "asgi_app" not in msg  # web endpoints are served
    assert f"set {ALLOW_ENV}=1" in msg
    with pytest.raises(InvalidError, match="Cannot deploy app 'inert-probe'"):
        inert.app.deploy()
    assert _app_names() == before and "inert-probe" not in before
    assert inert.app._running is None


def test_escape_hatch_runs_the_app_with_a_warning(
    plane: ServerHandle, inert: ModuleType, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(InertFeatureWarning, match=f"{ALLOW_ENV} is set, so they are ignored") as rec:
        with run_app(inert.app, show_logs=False):
            assert inert.tick.remote(4) == 12
    assert "tick: startup_timeout=60" in str(rec[0].message)
    assert "schedule" not in str(
        rec[0].message
    )  # schedules are honoured (a run does not schedule, as on Modal)
    assert "inert-probe" in _app_names()
