"""Retention decisions against a real database (SQLite and PostgreSQL), rows inserted directly, ``now`` injected."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from cloudmodal.server import models
from cloudmodal.server.retention import expired_apps, prune
from cloudmodal.server.service import ControlPlane, Settings

DAY = 86400.0
T0 = 2_000_000_000.0  # "now" for the pass: every row below is dated relative to it


def _blob(cp: ControlPlane, content: bytes, age_s: float) -> str:
    blob_id = cp.blobs.put(content)
    os.utime(cp.blobs.path(blob_id), (T0 - age_s, T0 - age_s))
    return blob_id


def _call(
    conn: Any,
    call_id: str,
    app_id: str,
    fid: str,
    age_s: float,
    states: list[int],
    *,
    cancelled: bool = False,
    args_blob: str | None = None,
    out_blob: str | None = None,
    output_age_s: float | None = None,
) -> None:
    at = T0 - age_s
    conn.execute(
        insert(models.calls).values(
            id=call_id,
            function_id=fid,
            app_id=app_id,
            created_at=at,
            num_inputs=len(states),
            cancelled=cancelled,
        )
    )
    for idx, state in enumerate(states):
        iid = conn.execute(
            insert(models.inputs)
            .values(
                call_id=call_id,
                function_id=fid,
                idx=idx,
                args=None,
                args_blob=args_blob,
                state=state,
                created_at=at,
            )
            .returning(models.inputs.c.id)
        ).scalar_one()
        if state == 2:
            conn.execute(
                insert(models.outputs).values(
                    input_id=iid,
                    call_id=call_id,
                    idx=idx,
                    data=None,
                    data_blob=out_blob,
                    created_at=T0 - (output_age_s if output_age_s is not None else age_s),
                )
            )


@pytest.fixture
def cp(tmp_path: Path, database_url: str) -> Any:
    plane = ControlPlane(Settings(database_url=database_url, state_dir=tmp_path))
    yield plane
    plane.db.dispose()


def _ids(cp: ControlPlane, col: Any) -> set[Any]:
    with cp.db.read() as conn:
        return {r[0] for r in conn.execute(select(col)).all()}


def test_prune_removes_what_is_old_and_finished_and_keeps_the_rest(cp: ControlPlane) -> None:
    b_args = _blob(cp, b"args" * 10, 2 * DAY)
    b_out = _blob(cp, b"out" * 10, 2 * DAY)
    b_run = _blob(cp, b"running" * 10, 2 * DAY)
    b_src = _blob(cp, b"deployed source", 40 * DAY)
    b_gone_src = _blob(cp, b"source of a stopped run", 2 * DAY)
    b_fresh = _blob(cp, b"uploaded a moment ago, its call not created yet", 60.0)
    with cp.db.write() as conn:
        A = models.apps
        conn.execute(
            insert(A),
            [
                dict(
                    id="ap-old",
                    name="old",
                    state="stopped",
                    ephemeral=True,
                    created_at=T0 - 3 * DAY,
                    stopped_at=T0 - 2 * DAY,
                ),
                dict(
                    id="ap-new",
                    name="new",
                    state="stopped",
                    ephemeral=True,
                    created_at=T0 - 3 * DAY,
                    stopped_at=T0 - 3600,
                ),
                dict(
                    id="ap-run",
                    name="run",
                    state="running",
                    ephemeral=True,
                    created_at=T0 - 40 * DAY,
                    stopped_at=None,
                ),
                dict(
                    id="ap-dep",
                    name="dep",
                    state="deployed",
                    ephemeral=False,
                    created_at=T0 - 40 * DAY,
                    stopped_at=None,
                ),
            ],
        )
        F = models.functions
        conn.execute(
            insert(F),
            [
                dict(
                    id="fu-old",
                    app_id="ap-old",
                    name="f",
                    spec={},
                    inline_env={},
                    source_blob=b_gone_src,
                    state="stopped",
                ),
                dict(
                    id="fu-run",
                    app_id="ap-run",
                    name="f",
                    spec={},
                    inline_env={},
                    source_blob=None,
                    state="active",
                ),
                dict(
                    id="fu-dep",
                    app_id="ap-dep",
                    name="f",
                    spec={},
                    inline_env={},
                    source_blob=b_src,
                    state="active",
                ),
            ],
        )
        conn.execute(
            insert(models.workers).values(id="wo-old", app_id="ap-old", function_id="fu-old", state="stopped")
        )
        _call(conn, "ca-done", "ap-run", "fu-run", 2 * DAY, [2, 2], args_blob=b_args, out_blob=b_out)
        _call(conn, "ca-running", "ap-run", "fu-run", 2 * DAY, [2, 1], args_blob=b_run)
        _call(conn, "ca-recent-output", "ap-run", "fu-run", 2 * DAY, [2], output_age_s=3600)
        _call(conn, "ca-cancelled", "ap-run", "fu-run", 2 * DAY, [2, 0], cancelled=True)
        _call(conn, "ca-cancel-running", "ap-run", "fu-run", 2 * DAY, [2, 1], cancelled=True)
        _call(conn, "ca-dep-3d", "ap-dep", "fu-dep", 3 * DAY, [2])
        _call(conn, "ca-dep-8d", "ap-dep", "fu-dep", 8 * DAY, [2])
        _call(conn, "ca-old-app", "ap-old", "fu-old", 2 * DAY, [2])
        L, E = models.logs, models.events
        conn.execute(
            insert(L),
            [
                dict(app_id="ap-old", ts=T0 - 2 * DAY, text="old run"),
                dict(app_id="ap-new", ts=T0 - 2 * DAY, text="run stopped an hour ago"),
                dict(app_id="ap-run", ts=T0 - 31 * DAY, text="running, a month ago"),
                dict(app_id="ap-run", ts=T0 - 2 * DAY, text="running, recent"),
                dict(app_id="ap-dep", ts=T0 - 31 * DAY, text="deployed, a month ago"),
                dict(app_id="ap-dep", ts=T0 - 2 * DAY, text="deployed, recent"),
            ],
        )
        conn.execute(
            insert(E),
            [
                dict(app_id="ap-old", ts=T0 - 2 * DAY, kind="k", message="old run", data={}),
                dict(app_id=None, ts=T0 - 31 * DAY, kind="k", message="control plane, a month ago", data={}),
                dict(app_id=None, ts=T0 - 2 * DAY, kind="k", message="control plane, recent", data={}),
                dict(app_id="ap-dep", ts=T0 - 2 * DAY, kind="k", message="deployed, recent", data={}),
            ],
        )

    report = prune(cp, now=T0)

    assert _ids(cp, models.calls.c.id) == {"ca-running", "ca-recent-output", "ca-cancel-running", "ca-dep-3d"}
    with cp.db.read() as conn:
        inputs = {r[0] for r in conn.execute(select(models.inputs.c.call_id)).all()}
        outputs = {r[0] for r in conn.execute(select(models.outputs.c.call_id)).all()}
    assert inputs == {"ca-running", "ca-recent-output", "ca-cancel-running", "ca-dep-3d"}
    assert outputs == {"ca-running", "ca-recent-output", "ca-cancel-running", "ca-dep-3d"}
    assert _ids(cp, models.logs.c.text) == {"run stopped an hour ago", "running, recent", "deployed, recent"}
    assert _ids(cp, models.events.c.message) == {"control plane, recent", "deployed, recent"}
    # the run stopped two days ago is gone with everything of it; the one stopped an hour ago stays
    assert _ids(cp, models.apps.c.id) == {"ap-new", "ap-run", "ap-dep"}
    assert _ids(cp, models.functions.c.id) == {"fu-run", "fu-dep"}
    assert _ids(cp, models.workers.c.id) == set()
    assert set(report.removed_blobs) == {b_args, b_out, b_gone_src}
    for kept in (b_run, b_src, b_fresh):
        assert cp.blobs.get(kept)
    for gone in (b_args, b_out, b_gone_src):
        assert not (cp.blobs.root / gone[3:5] / gone).exists()
    assert report.calls == 4 and report.apps == 1

    # a second pass finds nothing more to do
    assert not prune(cp, now=T0).any()


def test_a_call_with_many_inputs_is_pruned_in_batches(cp: ControlPlane) -> None:
    with cp.db.write() as conn:
        conn.execute(insert(models.apps).values(id="ap-run", name="run", state="running", ephemeral=True))
        _call(conn, "ca-big", "ap-run", "fu-x", 2 * DAY, [2] * 1234)
    report = prune(cp, now=T0)
    assert (report.calls, report.inputs, report.outputs) == (1, 1234, 1234)
    assert _ids(cp, models.inputs.c.id) == set()


def test_expired_apps_are_stopped_ephemeral_runs_past_the_retention() -> None:
    rows = [
        ("ap-a", True, "stopped", T0 - 2 * DAY, T0 - 3 * DAY),
        ("ap-b", True, "stopped", T0 - 3600, T0 - 3 * DAY),
        ("ap-c", True, "running", None, T0 - 9 * DAY),
        ("ap-d", False, "stopped", T0 - 9 * DAY, T0 - 9 * DAY),  # a deployed app's history is kept longer
        ("ap-e", True, "stopped", None, T0 - 2 * DAY),  # stopped before stopped_at was recorded
    ]
    assert expired_apps(rows, T0, DAY) == ["ap-a", "ap-e"]
