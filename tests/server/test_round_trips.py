"""Round trips and blocking work off the hot paths: a put is one statement (on PostgreSQL its own transaction),
a pooled connection is pinged only after sitting idle (and a dead one replaced), and the event loop answers
tokens and workers from memory, reading the database on the thread pool instead."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text
from support import bare_plane, function_with_workers

from cloudmodal.server.auth import NOT_CACHED, TokenStore
from cloudmodal.server.db import Database, ping_idle_connections
from cloudmodal.server.http_errors import HTTPError
from cloudmodal.server.router import NeedsIO, Route, TableApp
from cloudmodal.server.security import Identity, identity_for
from cloudmodal.server.service import ControlPlane, ParkedClaim
from cloudmodal.server.states import InputState

WAIT = 10.0


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    with bare_plane(tmp_path, database_url, "ap-r") as plane:
        yield plane


def test_a_put_hands_inputs_to_parked_workers_and_leaves_the_rest_pending_in_one_statement(
    cp: ControlPlane,
) -> None:
    """Two parked workers take 2 + 3 inputs of a put of 8, the other 3 are left pending: all in the one
    statement the put may send (on PostgreSQL a second statement raises instead of committing apart)."""
    fid = function_with_workers(cp, "ap-r", "f", ["wk-a", "wk-b"])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        parked = [
            ParkedClaim("wk-a", fid, 2, loop, asyncio.Event()),
            ParkedClaim("wk-b", fid, 3, loop, asyncio.Event()),
        ]
        for pc in parked:
            cp.park(pc)
        cp.calls.create_call("ca-1", fid, "map", [])
        assert cp.put_inputs("ca-1", fid, [(i, None, b"x%d" % i, None) for i in range(8)]) == 8
        for pc in parked:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(pc.done.wait(), WAIT), loop).result(WAIT)
        got = {pc.worker_id: sorted(r.idx for r in pc.rows or []) for pc in parked}
        assert sorted(len(v) for v in got.values()) == [2, 3]
        with cp.db.read() as conn:
            rows = conn.execute(text('SELECT idx, state, worker_id FROM "input" ORDER BY idx')).all()
        assert len(rows) == 8
        handed = {r[0]: r[2] for r in rows if r[1] == InputState.CLAIMED}
        assert handed == {idx: wid for wid, idxs in got.items() for idx in idxs}
        assert sum(1 for r in rows if r[1] == InputState.PENDING and r[2] is None) == 3
        # re-sending the same indexes adds nothing and hands nothing out
        assert cp.put_inputs("ca-1", fid, [(i, None, b"x%d" % i, None) for i in range(8)]) == 8
        with cp.db.read() as conn:
            assert conn.execute(text('SELECT count(*) FROM "input"')).scalar_one() == 8
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_a_one_statement_transaction_refuses_a_second_statement(
    postgres_database: str, tmp_path: Path
) -> None:
    db = Database(postgres_database)
    try:
        with pytest.raises(RuntimeError, match="second statement"):
            with db.hot(one_statement=True) as hot:
                assert hot.function_state("fn-none") is None
                hot.function_state("fn-none")
        with db.hot() as hot:  # an ordinary transaction runs as many as it likes
            assert hot.function_state("fn-none") is None
            assert hot.function_state("fn-none") is None
    finally:
        db.dispose()


def _backend_pid(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _kill(postgres_url: str, pid: int) -> None:
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_an_idle_pooled_connection_that_died_is_replaced_before_use(postgres_database: str) -> None:
    engine = create_engine(postgres_database, pool_size=1, max_overflow=0)
    ping_idle_connections(engine, idle_s=0.0)  # every checkout counts as idle: pinged
    try:
        pid = _backend_pid(engine)
        _kill(postgres_database, pid)  # the server closes it while it sits in the pool
        with engine.connect() as conn:  # answered on a new connection, no error
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def test_a_connection_in_steady_use_is_not_pinged(postgres_database: str) -> None:
    """Within the idle period no ping is sent: a connection closed meanwhile fails its next statement (as
    one that breaks mid-transaction does), and is replaced for the one after."""
    engine = create_engine(postgres_database, pool_size=1, max_overflow=0)
    ping_idle_connections(engine, idle_s=3600.0)
    try:
        pid = _backend_pid(engine)
        _kill(postgres_database, pid)
        with pytest.raises(Exception) as e, engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert getattr(e.value, "connection_invalidated", False)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_identify_without_reading_answers_only_from_the_cache(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'cm.db'}")
    try:
        store = TokenStore(db)
        token = store.create("owner")
        reads = store.reads
        assert store.identify(token, read=False) is NOT_CACHED
        assert store.identify("cm_unknown", read=False) is NOT_CACHED
        assert store.reads == reads  # nothing was read
        who = store.identify(token)
        assert who is not None and who.kind == "owner"
        assert store.identify(token, read=False) == who  # now from memory
        assert store.identify("cm_unknown") is None
    finally:
        db.dispose()


def test_the_router_reads_an_uncached_token_on_its_thread_pool_not_on_the_event_loop() -> None:
    calls: list[tuple[bool, str]] = []
    who = identity_for("owner", "tk-1")
    assert who is not None

    def authenticate(header: str, client: str | None, may_block: bool) -> Identity:
        calls.append((may_block, threading.current_thread().name))
        if header != "Bearer good":
            raise HTTPError(401, "Invalid or revoked token.")
        if not may_block:
            raise NeedsIO
        return who

    async def hello() -> Any:
        return {"hello": True}

    app = TableApp([Route("GET", "/v1/hello", "owner", hello)], authenticate)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            ok = await client.get("/v1/hello", headers={"authorization": "Bearer good"})
            assert ok.status_code == 200
            bad = await client.get("/v1/hello", headers={"authorization": "Bearer bad"})
            assert bad.status_code == 401

    loop_thread = threading.current_thread().name
    asyncio.run(go())
    app.close()
    # the good token: asked from memory on the loop, then read on a pool thread; the bad one refused at once
    assert [c[0] for c in calls] == [False, True, False]
    assert calls[0][1] == loop_thread and calls[2][1] == loop_thread
    assert calls[1][1] != loop_thread and calls[1][1].startswith("cp-db")
