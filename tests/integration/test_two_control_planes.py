"""Two control planes on one database: both serve the API, exactly one reconciles (launches, stops and
writes off workers), and the other takes over when it goes. Real servers, real workers, SQLite and
PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import basic
import httpx
import pytest
from sqlalchemy import text
from support import start_server, use_server

from cloudmodal.client.session import run_app
from cloudmodal.server import models


def _until(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("new_postgres_database")()


def test_one_reconciles_and_the_other_takes_over(database_url: str, tmp_path: Path) -> None:
    shared = {"blob_dir": tmp_path / "blobs"}  # control planes sharing a database share its blob store
    a = start_server(tmp_path / "a", database_url, **shared)
    b = None
    try:
        assert _until(lambda: a.reconciler.is_leader)
        b = start_server(tmp_path / "b", database_url, **shared)
        time.sleep(1.5)  # past the standby's retry interval: it has tried, and must have been refused
        assert a.reconciler.is_leader and not b.reconciler.is_leader
        assert [httpx.get(h.url + "/healthz").json()["reconciling"] for h in (a, b)] == [True, False]
        if not a.cp.db.is_sqlite:  # the leader's lock session holds no transaction open (vacuum can run)
            with a.cp.db.read() as conn:
                idle = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE l.locktype = 'advisory' AND a.state = 'idle in transaction'"
                        " AND a.datname = current_database()"  # pg_locks is cluster-wide: other tests' too
                    )
                ).scalar()
            assert idle == 0

        # A call made through the standby runs on a worker the leader launched, and its answer comes back.
        with use_server(b), run_app(basic.app, show_logs=False):
            assert basic.square.remote(7) == 49
            fid = basic.square._function_id
        with b.cp.db.read() as conn:
            W = models.workers  # noqa: N806
            providers = {r.provider for r in conn.execute(W.select().where(W.c.function_id == fid))}
        assert providers == {"local"}
        assert not b.reconciler.handles, "the standby launched workers"

        a.stop()
        a = None
        assert _until(lambda: b.reconciler.is_leader), "the standby did not take over"

        def leaders() -> list[str]:
            with b.cp.db.read() as conn:
                E = models.events  # noqa: N806
                q = E.select().where(E.c.kind == "control_plane.leader").order_by(E.c.id)
                return [r.message for r in conn.execute(q)]

        # the new leader writes its event just after it takes the lock: wait for it rather than race it
        assert _until(lambda: len(leaders()) == 2), leaders()
        assert leaders()[1].startswith(b.url)
    finally:
        if a is not None:
            a.stop()
        if b is not None:
            b.stop()


def test_a_released_lock_is_free_at_once(database_url: str) -> None:
    """Leadership released by a control plane that keeps running (its reconciler stopped) is free for
    another at once, not when the process exits: the session holding it is closed, not pooled."""
    from cloudmodal.server.db import Database, Leadership

    one, two = Database(database_url), Database(database_url)
    try:
        first, second = Leadership(one), Leadership(two)
        assert first.held() and first.held()  # taken, then confirmed
        assert not second.held()
        first.release()
        assert second.held()
        assert not first.held()
        second.release()
    finally:
        one.dispose()
        two.dispose()
