"""``Function.update_autoscaler`` on the control plane: the stored settings change without a new version, bad
values are refused, and a second control plane on the same database sees the change through the spec it reads
each tick (its cached spec is replaced), on both databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloudmodal.exception import InvalidError, PermissionDeniedError
from cloudmodal.server import models
from cloudmodal.server.app import default_settings
from cloudmodal.server.security import Identity
from cloudmodal.server.service import ControlPlane
from cloudmodal.spec import FunctionSpec

OWNER = Identity("owner", "tk-owner", "owner")


@pytest.fixture
def planes(database_url: str, tmp_path: Path) -> Any:
    a = ControlPlane(default_settings(tmp_path / "a", database_url=database_url))
    b = ControlPlane(default_settings(tmp_path / "b", database_url=database_url))
    yield a, b
    a.db.dispose()
    b.db.dispose()


def stored_spec(cp: ControlPlane, fid: str) -> dict[str, Any]:
    with cp.db.read() as conn:
        return dict(
            conn.execute(select(models.functions.c.spec).where(models.functions.c.id == fid)).scalar_one()
        )


def test_an_update_through_one_plane_reaches_the_others_cached_spec(planes: Any) -> None:
    a, b = planes
    a.apps.create_app("ap-u", "upd", False)
    spec = FunctionSpec(name="f", module="m", qualname="f").to_wire()
    created = a.functions.create_function({"app_id": "ap-u", "name": "f", "spec": spec})
    fid = created["function_id"]
    assert b.functions.spec_of(fid).autoscaler.min_containers == 0  # b caches the spec
    a.functions.update_autoscaler(OWNER, fid, {"min_containers": 2, "scaledown_window": 30})
    # without the stored spec b keeps what it cached (the negative control of the refresh below)
    assert b.functions.spec_of(fid).autoscaler.min_containers == 0
    fresh = b.functions.spec_of(fid, stored_spec(b, fid))
    assert (fresh.autoscaler.min_containers, fresh.autoscaler.scaledown_window) == (2, 30)
    assert a.functions.function_row(fid)["version"] == created.get("version", 1)  # no new version


def test_bad_settings_and_callers_are_refused(planes: Any) -> None:
    a, _ = planes
    a.apps.create_app("ap-v", "bad", False)
    spec = FunctionSpec(name="g", module="m", qualname="g").to_wire()
    fid = a.functions.create_function({"app_id": "ap-v", "name": "g", "spec": spec})["function_id"]
    with pytest.raises(InvalidError, match="keep_warm"):
        a.functions.update_autoscaler(OWNER, fid, {"keep_warm": 1})
    with pytest.raises(InvalidError):
        a.functions.update_autoscaler(OWNER, fid, {"min_containers": 5, "max_containers": 2})
    worker = Identity("worker", "worker:wk-1", "worker:wk-1", worker_id="wk-1")
    with pytest.raises(PermissionDeniedError):
        a.functions.update_autoscaler(worker, fid, {"min_containers": 1})
    assert a.functions.spec_of(fid, stored_spec(a, fid)).autoscaler.min_containers == 0
