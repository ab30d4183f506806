"""Retention on a real control plane: finished calls' rows and blob files, and old logs, are pruned; a deployed
function's source, a running app's source and a running call stay. Real HTTP, database and workers."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import basic
import pytest
from sqlalchemy import select
from support import start_server, use_server

from cloudmodal.client.session import run_app
from cloudmodal.server import models
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.retention import prune

BIG = 3 * 1024 * 1024  # over the inline limit: travels as a blob
YEAR = 365 * 86400.0
APPS = Path(__file__).parent / "apps"


def _fresh_deploy_app() -> Any:
    """A copy of the deploy test app of its own (deploying changes the handles of the module it deploys,
    which another test module uses)."""
    spec = importlib.util.spec_from_file_location("issue11_deploy_app", APPS / "issue11_deploy_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blob_files(handle: ServerHandle) -> set[str]:
    return {p.name for p in handle.cp.blobs.root.glob("*/bl-*")}


def _rows(handle: ServerHandle, query: Any) -> list[Any]:
    with handle.cp.db.read() as conn:
        return list(conn.execute(query).all())


@pytest.fixture(params=["sqlite", "postgres"])
def plane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerHandle]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cloudmodal.db'}"
    else:
        url = request.getfixturevalue("new_postgres_database")()
    handle = start_server(tmp_path, url)
    try:
        with use_server(handle):
            yield handle
    finally:
        handle.stop()


def test_prune_removes_finished_calls_blobs_and_logs_and_keeps_what_is_live(plane: ServerHandle) -> None:
    C, F, L = models.calls, models.functions, models.logs
    _fresh_deploy_app().app.deploy(name="retention-deploy")
    deployed_src = {
        r[0]
        for r in _rows(
            plane,
            select(F.c.source_blob)
            .join(models.apps, models.apps.c.id == F.c.app_id)
            .where(models.apps.c.ephemeral.is_(False)),
        )
    }
    assert deployed_src and None not in deployed_src
    payloads = [bytes([i]) * BIG for i in range(3)]
    with run_app(basic.app, show_logs=False):
        before = _rows(plane, select(C.c.id))
        assert [len(b) for b in basic.echo_bytes.map(payloads)] == [BIG] * 3
        assert basic.printer.remote("retention") is not None
        (map_call,) = [
            r[0] for r in _rows(plane, select(C.c.id, C.c.kind)) if r[1] == "map" and (r[0],) not in before
        ]
        data_blobs = {
            r[0]
            for r in _rows(
                plane, select(models.inputs.c.args_blob).where(models.inputs.c.call_id == map_call)
            )
        }
        assert len(data_blobs) == 3 and data_blobs <= _blob_files(plane)
        assert any("log line: retention" in r[0] for r in _rows(plane, select(L.c.text)))
        running_src = {r[0] for r in _rows(plane, select(F.c.source_blob).where(F.c.state == "active"))}

        sleeper = basic.nap.spawn(1.5)  # still running (or queued) during the pass below
        report = prune(plane.cp, now=time.time() + YEAR)
        assert sleeper.get(timeout=60) == "woke"

    assert map_call not in {r[0] for r in _rows(plane, select(C.c.id))}
    assert sleeper.object_id in {r[0] for r in _rows(plane, select(C.c.id))}
    assert _rows(plane, select(models.inputs.c.id).where(models.inputs.c.call_id == map_call)) == []
    assert _rows(plane, select(models.outputs.c.id).where(models.outputs.c.call_id == map_call)) == []
    assert not any("log line: retention" in r[0] for r in _rows(plane, select(L.c.text)))
    files = _blob_files(plane)
    assert not data_blobs & files and data_blobs <= set(report.removed_blobs)
    assert deployed_src <= files and running_src <= files  # live functions' sources stay


def test_the_reconciler_prunes_on_its_own(tmp_path: Path) -> None:
    """The hook: with a short retention the reconciling control plane removes a finished call and its blob
    by itself, without anyone calling prune."""
    handle = start_server(
        tmp_path,
        f"sqlite:///{tmp_path / 'cloudmodal.db'}",
        retention_calls_ephemeral_s=5.0,  # long enough to read the rows after the call returns
        retention_interval_s=0.2,
    )
    try:
        with use_server(handle), run_app(basic.app, show_logs=False):
            assert len(basic.echo_bytes.remote(b"\x07" * BIG)) == BIG
            (call_id,) = [r[0] for r in _rows(handle, select(models.calls.c.id))]
            (blob,) = [r[0] for r in _rows(handle, select(models.inputs.c.args_blob))]
            deadline = time.time() + 30
            while time.time() < deadline and (
                _rows(handle, select(models.calls.c.id)) or blob in _blob_files(handle)
            ):
                time.sleep(0.1)
            assert _rows(handle, select(models.calls.c.id)) == [], f"call {call_id} was never pruned"
            assert _rows(handle, select(models.inputs.c.id)) == []
            assert blob not in _blob_files(handle)
    finally:
        handle.stop()
