"""The control plane's services store the states of :mod:`cloudmodal.server.states` as the plain values the
database has always held (strings, and small integers for inputs), on both databases."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import text

from cloudmodal.server.app import default_settings
from cloudmodal.server.queue import OutputItem
from cloudmodal.server.service import ControlPlane, ParkedClaim
from cloudmodal.server.states import AppState, FunctionState, InputState, OutputStatus, WorkerState
from cloudmodal.spec import FunctionSpec


def test_states_are_stored_as_plain_values(database_url: str, tmp_path: Path) -> None:
    cp = ControlPlane(default_settings(tmp_path, database_url=database_url))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        spec = FunctionSpec(name="f", module="m", qualname="f").to_wire()
        assert cp.apps.create_app("ap-s", "states", True)["state"] == "running"
        fid = cp.functions.create_function({"app_id": "ap-s", "name": "f", "spec": spec})["function_id"]
        for wid in ("wk-a", "wk-b"):
            cp.workers.add_worker(wid, "ap-s", fid)
            cp.workers.worker_ready(wid)
        # one input handed to a parked worker (written claimed), one left pending then claimed, and answered
        pc = ParkedClaim("wk-a", fid, 1, loop, asyncio.Event())
        cp.park(pc)
        cp.calls.create_call("ca-1", fid, "remote", [(0, None, b"x", None)])
        cp.calls.create_call("ca-2", fid, "remote", [(0, None, b"x", None)])
        (claimed,) = cp.claim("wk-b", fid, 1)
        cp.post_outputs("wk-b", [OutputItem(claimed.input_id, OutputStatus.SUCCESS, b"y")])
        cp.calls.create_call("ca-3", fid, "remote", [(0, None, b"x", None)])
        cp.calls.cancel_call("ca-3")
        cp.workers.drain_worker("wk-b", "test")
        with cp.db.read() as conn:
            inputs: dict[str, Any] = dict(conn.execute(text('SELECT call_id, state FROM "input"')).all())
            outputs: dict[str, Any] = dict(conn.execute(text('SELECT call_id, status FROM "output"')).all())
            workers: dict[str, Any] = dict(conn.execute(text('SELECT id, state FROM "worker"')).all())
            fn_state = conn.execute(text('SELECT state FROM "function"')).scalar_one()
        assert inputs == {"ca-1": 1, "ca-2": 2, "ca-3": 2}
        assert all(type(v) is int for v in inputs.values())
        assert outputs == {"ca-2": "success", "ca-3": "cancelled"}
        assert workers == {"wk-a": "ready", "wk-b": "draining"}
        assert fn_state == "active"
        assert all(type(v) is str for v in [*outputs.values(), *workers.values(), fn_state])
        cp.apps.stop_app("ap-s")
        cp.workers.worker_stopped("wk-a", "test", crashed=False)
        with cp.db.read() as conn:
            app_state = conn.execute(text('SELECT state FROM "app"')).scalar_one()
            fn_state = conn.execute(text('SELECT state FROM "function"')).scalar_one()
            stopped = conn.execute(text("SELECT state FROM \"worker\" WHERE id = 'wk-a'")).scalar_one()
        assert (app_state, fn_state, stopped) == ("stopped", "stopped", "stopped")
        # and rows read back compare equal to the enums
        assert (AppState.STOPPED, FunctionState.STOPPED, WorkerState.STOPPED) == (
            app_state,
            fn_state,
            stopped,
        )
        assert inputs["ca-1"] == InputState.CLAIMED
    finally:
        loop.call_soon_threadsafe(loop.stop)
        cp.db.dispose()


def test_the_queue_asks_the_functions_service_for_policies(tmp_path: Path) -> None:
    """The queue's retry and crash budgets come from the one cache of function policies."""
    cp = ControlPlane(default_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'cp.db'}"))
    try:
        assert cp.queue.policy_for == cp.functions.policy_for
    finally:
        cp.db.dispose()
