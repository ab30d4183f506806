"""One bad pool never stops the reconciler for the others (issue 9, point 4).

Function rows stored before the server validated specs (written here straight into the database) make one
pool fail on every tick; a real control plane must skip that pool, say so once on its app's event log, and go
on serving every other app: a cold start of another app's function (real worker processes) answers.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import basic
import pytest

from cloudmodal.client.session import run_app
from cloudmodal.ids import new_id
from cloudmodal.server import models
from cloudmodal.server.autoscaler import Autoscaler, PoolSnapshot
from cloudmodal.spec import FunctionSpec

F = models.functions


def _broken_specs() -> dict[str, dict[str, Any]]:
    good = basic.square.spec.to_wire()
    wrong_type = copy.deepcopy(good)  # the attack in the issue: accepted before, a TypeError on every tick
    wrong_type["autoscaler"]["min_containers"] = "1"
    unparsable = copy.deepcopy(good)  # FunctionSpec.from_wire itself raises on this row
    unparsable["autoscaler"]["surprise"] = True
    unparsable["autoscaler"]["min_containers"] = 1
    return {"wrong_type": wrong_type, "unparsable": unparsable}


def test_the_broken_rows_do_break_the_autoscaler_when_used_directly() -> None:
    """Negative control: without the reconciler's isolation these rows raise where a tick reads them."""
    specs = _broken_specs()
    spec = FunctionSpec.from_wire(specs["wrong_type"])  # from_wire checks no types
    snapshot = PoolSnapshot(backlog=0, in_flight=0, workers=[], settings=spec.autoscaler)
    with pytest.raises(TypeError):
        Autoscaler().decide(snapshot, time.time())
    with pytest.raises(TypeError):
        FunctionSpec.from_wire(specs["unparsable"])


def _insert_function(cp: Any, app_id: str, name: str, spec: dict[str, Any]) -> str:
    fid = new_id("fu")
    now = time.time()
    with cp.db.write() as conn:
        conn.execute(
            F.insert().values(
                id=fid,
                app_id=app_id,
                name=name,
                spec=spec,
                module="basic",
                inline_env={},
                definition_hash=f"stored-before-validation-{name}",
                version=1,
                created_at=now,
                last_active_at=now,
                state="active",
            )
        )
    return fid


def _events(cp: Any, app_id: str, kind: str, fid: str) -> list[dict[str, Any]]:
    return [e for e in cp.activity.events(app_id, 0, 10_000) if e["kind"] == kind and e["function_id"] == fid]


def _wait_for(what: str, cond: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_a_broken_pool_is_skipped_reported_once_and_others_are_served(control_plane: Any) -> None:
    cp = control_plane.cp
    app_id = new_id("ap")
    cp.apps.create_app(app_id, f"stored-before-validation-{app_id[-6:]}", ephemeral=False)
    bad = {kind: _insert_function(cp, app_id, kind, spec) for kind, spec in _broken_specs().items()}

    # Each broken pool is reported on its app's event log, naming the function and what is wrong.
    for kind, fid in bad.items():
        (event,) = _wait_for(f"pool.error for {kind}", lambda fid=fid: _events(cp, app_id, "pool.error", fid))
        assert kind in event["message"]
    wrong_type = _events(cp, app_id, "pool.error", bad["wrong_type"])[0]["message"]
    assert "spec.autoscaler.min_containers" in wrong_type and "integer" in wrong_type
    assert "surprise" in _events(cp, app_id, "pool.error", bad["unparsable"])[0]["message"]

    # Another app's function still cold-starts (a real worker process) and answers, while every tick
    # meets the broken pools.
    with run_app(basic.app, show_logs=False):
        # A deadline instead of .remote(): before the fix this call hung forever.
        assert basic.square.spawn(12).get(timeout=120) == 144
        assert list(basic.square.map(range(5))) == [0, 1, 4, 9, 16]

    # Reported once per distinct error, not once per tick: every tick that cold-started the other function
    # met the broken pools again.
    for fid in bad.values():
        assert len(_events(cp, app_id, "pool.error", fid)) == 1

    # Deploying the function again with a valid spec clears it, and that is noted once too.
    good = basic.square.spec.to_wire()
    fixed = cp.functions.create_function({"app_id": app_id, "name": "wrong_type", "spec": good})
    assert fixed["function_id"] == bad["wrong_type"] and fixed["version"] == 2
    _wait_for("pool.recovered", lambda: _events(cp, app_id, "pool.recovered", bad["wrong_type"]))
    assert len(_events(cp, app_id, "pool.error", bad["wrong_type"])) == 1
    assert not _events(cp, app_id, "pool.recovered", bad["unparsable"])
    cp.apps.stop_app(app_id, reason="test over")
