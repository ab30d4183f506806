"""Declared-but-inert features (a function's startup_timeout) are refused
when an app runs or deploys, naming each function and feature; CLOUDMODAL_ALLOW_INERT=1 makes it a warning.
The spec layer still accepts them (tests/unit/test_app.py). Schedules, web endpoints, volumes and named secrets are
honoured, so they are not refused."""

from __future__ import annotations

import re

import pytest

import cloudmodal
from cloudmodal import App, Cron, Period, Secret, Volume
from cloudmodal.client import session
from cloudmodal.client.unsupported import ALLOW_ENV, InertFeatureWarning, app_inert_uses, check_app
from cloudmodal.exception import InvalidError


def square(x: int) -> int:
    return x * x


def no_args() -> None:
    pass


class Model:
    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x

    @cloudmodal.asgi_app(label="model-api")
    def api(self) -> None:
        pass


class Plain:
    @cloudmodal.method()
    def predict(self, x: int) -> int:
        return x


@pytest.fixture(autouse=True)
def _no_escape_hatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)


def _uses(app: App) -> list[tuple[str, str]]:
    return [(u.where, u.feature) for u in app_inert_uses(app)]


def test_each_inert_feature_is_named_with_its_function() -> None:
    app = App("inert")
    app.function(name="tick", schedule=Period(hours=1))(no_args)
    app.function(name="cron", schedule=Cron("0 9 * * 1-5"))(no_args)
    app.function(name="sec", secrets=[Secret.from_name("openai"), Secret.from_dict({"MODE": "prod"})])(square)
    app.function(name="web")(cloudmodal.fastapi_endpoint(method="POST")(square))
    app.function(name="srv")(cloudmodal.web_server(8000)(no_args))
    app.function(name="slow", startup_timeout=60)(square)
    app.cls()(Model)
    # schedules fire (cloudmodal/server/scheduler.py); web endpoints are served (cloudmodal/server/web_gateway.py)
    assert _uses(app) == [("slow", "startup_timeout=60")]


def test_schedules_are_not_inert() -> None:
    app = App("scheduled")
    app.function(name="tick", schedule=Period(hours=1))(no_args)
    app.function(name="cron", schedule=Cron("0 9 * * 1-5", timezone="Europe/Berlin"))(no_args)
    assert _uses(app) == []
    check_app(app, "deploy")  # no error, no warning


def test_app_level_named_secrets_and_volumes_are_not_inert() -> None:
    app = App("defaults", secrets=[Secret.from_name("team")], volumes={"/shared": Volume.from_name("shared")})
    app.function()(square)
    assert _uses(app) == []


def test_what_works_is_accepted() -> None:
    app = App("fine", secrets=[Secret.from_dict({"A": "1"})])
    app.function(
        gpu=["H100", "A100-80GB"],
        retries=2,
        timeout=60,
        secrets=[Secret.from_dict({"B": "2"})],
        env={"C": "3"},
    )(square)
    app.cls(max_containers=2)(Plain)
    assert _uses(app) == []
    check_app(app)  # no error, no warning


def test_the_error_lists_every_use_and_says_what_to_do() -> None:
    app = App("inert")
    app.function(name="slow", startup_timeout=5, secrets=[Secret.from_name("openai")])(square)
    app.function(name="web")(cloudmodal.fastapi_endpoint()(square))
    with pytest.raises(InvalidError) as info:
        check_app(app, "deploy")
    msg = str(info.value)
    assert msg.startswith("Cannot deploy app 'inert': it declares features that are not implemented yet")
    assert "  - slow: startup_timeout=5: it is not enforced yet; remove it" in msg
    assert "web:" not in msg  # web endpoints are served (cloudmodal.server.web_gateway)
    assert "Remove them and deploy without them" in msg and f"set {ALLOW_ENV}=1" in msg


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_escape_hatch_turns_the_error_into_a_warning(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    app = App()
    app.function(startup_timeout=20)(square)
    monkeypatch.setenv(ALLOW_ENV, value)
    with pytest.warns(
        InertFeatureWarning, match=re.escape(f"{ALLOW_ENV} is set, so they are ignored")
    ) as rec:
        check_app(app)
    assert "square: startup_timeout=20: it is not enforced yet" in str(rec[0].message)


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_other_values_do_not_open_the_hatch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    app = App()
    app.function(startup_timeout=30)(square)
    monkeypatch.setenv(ALLOW_ENV, value)
    with pytest.raises(InvalidError, match="square: startup_timeout=30: it is not enforced yet"):
        check_app(app)


def test_run_and_deploy_refuse_before_touching_a_control_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    # No control plane is configured: had either got past the check, it would have started an embedded one
    # (run) or said that none is configured (deploy).
    def no_plane(*args: object, **kwargs: object) -> None:
        raise AssertionError("the check must come before any connection")

    monkeypatch.setattr(session, "connect", no_plane)
    monkeypatch.setattr(session, "current_session", no_plane)
    app = App("inert")
    app.function(startup_timeout=60)(square)
    with pytest.raises(InvalidError, match="Cannot run app 'inert'"):
        with app.run():
            pass
    with pytest.raises(InvalidError, match="Cannot deploy app 'inert'"):
        app.deploy()


@pytest.mark.parametrize(
    ("options", "feature"),
    [
        ({"block_network": True}, "block_network=True"),
        ({"restrict_modal_access": True}, "restrict_modal_access=True"),
        ({"i6pn": True}, "i6pn=True"),
        ({"routing_region": "us-east"}, "routing_region='us-east'"),
        ({"ephemeral_disk": 1024 * 1024}, "ephemeral_disk=1048576"),
        ({"_experimental_restrict_output": True}, "_experimental_restrict_output=True"),
    ],
)
def test_options_nothing_honours_are_refused(options: dict, feature: str) -> None:
    app = App("inert-options")
    app.function(name="f", **options)(square)
    assert _uses(app) == [("f", feature)]
    with pytest.raises(InvalidError, match=feature.split("=")[0]):
        check_app(app, "run")
