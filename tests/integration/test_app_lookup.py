"""``App.lookup(name, create_if_missing=...)`` against a real control plane (SQLite and PostgreSQL)."""

from __future__ import annotations

import secrets

import pytest

import cloudmodal
from cloudmodal.client.session import current_session
from cloudmodal.exception import NotFoundError


def test_lookup_finds_creates_and_refuses(control_plane):
    name = "lookup-" + secrets.token_hex(4)
    with pytest.raises(NotFoundError, match="create_if_missing=True"):
        cloudmodal.App.lookup(name)
    made = cloudmodal.App.lookup(name, create_if_missing=True)
    assert made.name == name and made.app_id is not None and made.app_id.startswith("ap-")
    assert cloudmodal.App.lookup(name).app_id == made.app_id
    assert cloudmodal.App.lookup(name, create_if_missing=True).app_id == made.app_id  # no second app
    assert cloudmodal.App.lookup(made.app_id).name == name

    # A newer ephemeral app of the same name (the name's newest row) does not hide the deployed one.
    with cloudmodal.App(name).run() as running:
        assert running.app_id != made.app_id
        assert cloudmodal.App.lookup(name).app_id == made.app_id

    current_session().transport.post(f"/v1/apps/{made.app_id}/stop")
    with pytest.raises(NotFoundError):
        cloudmodal.App.lookup(name)
    fresh = cloudmodal.App.lookup(name, create_if_missing=True)
    assert fresh.app_id != made.app_id


deployed_app = cloudmodal.App("lookup-deployed")


@deployed_app.function()
def one() -> int:
    return 1


def test_lookup_finds_a_deployed_app(control_plane):
    deployed = deployed_app.deploy()
    assert cloudmodal.App.lookup("lookup-deployed").app_id == deployed["app_id"]
    # modal.runner's programmatic form: a redeploy of the same app, one version up
    from cloudmodal.runner import deploy_app

    again = deploy_app(deployed_app)
    assert again.app_id == deployed["app_id"] and again.version == deployed["version"] + 1
    with pytest.raises(NotFoundError):
        cloudmodal.App.lookup("ap-" + "x" * 22)
