"""The warm call path's shortcuts, end to end: inputs handed to parked claims, outputs handed to waiting
callers, claims over a WebSocket, and the service time workers report — each checked against the database,
which stays the record."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import basic
import msgpack
import pytest
from sqlalchemy import select

from cloudmodal.client.session import run_app
from cloudmodal.client.transport import Transport
from cloudmodal.exception import AuthError
from cloudmodal.server import models


@pytest.fixture(scope="module")
def app(control_plane):
    with run_app(basic.app, show_logs=False) as running:
        yield running


def _parked_workers(cp, function_id: str, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with cp._lock:
            parked = [pc.worker_id for pc in cp._parked.get(function_id, ())]
        if parked:
            return parked
        time.sleep(0.02)
    return []


def test_an_idle_worker_parks_and_is_handed_the_next_input(app, control_plane):
    cp = control_plane.cp
    assert basic.square.remote(3) == 9  # a worker is up
    fid = basic.square._function_id
    parked = _parked_workers(cp, fid)
    assert parked, "an idle worker's claim should be parked on its function"
    assert basic.square.remote(12) == 144
    with cp.db.read() as conn:
        I, O = models.inputs, models.outputs  # noqa: E741
        row = conn.execute(
            select(I.c.state, I.c.worker_id, I.c.attempts, I.c.crashes)
            .where(I.c.function_id == fid)
            .order_by(I.c.id.desc())
            .limit(1)
        ).one()
        outputs = conn.execute(
            select(O.c.gen_index, O.c.status).where(
                O.c.call_id.in_(
                    select(I.c.call_id)
                    .where(I.c.function_id == fid)
                    .order_by(I.c.id.desc())
                    .limit(1)
                    .scalar_subquery()
                )
            )
        ).all()
    assert row.state == 2 and row.worker_id in parked and (row.attempts, row.crashes) == (0, 0)
    assert outputs == [(-1, "success")]  # written once, though the caller got it without reading it back


def test_concurrent_callers_each_get_their_own_answer(app):
    results: dict[tuple[int, int], int] = {}
    errors: list[BaseException] = []

    def caller(t: int) -> None:
        try:
            for i in range(40):
                results[(t, i)] = basic.add.remote(t * 1000, b=i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors
    assert results == {(t, i): t * 1000 + i for t in range(6) for i in range(40)}


def test_generator_outputs_arrive_in_order_through_the_hand_off(app):
    for _ in range(5):
        assert list(basic.countdown.remote_gen(6)) == list(range(6))


def test_a_drained_worker_gets_no_more_inputs(app, control_plane):
    cp = control_plane.cp
    assert basic.pid_of.remote(0)
    fid = basic.pid_of._function_id
    parked = _parked_workers(cp, fid)
    assert parked
    for wid in parked:
        cp.workers.drain_worker(wid, "test: drained while parked")
    # the next input goes to a new worker, not to the drained one's claim
    with cp._lock:
        assert all(pc.worker_id not in parked for pc in cp._parked.get(fid, ()))
    assert isinstance(basic.pid_of.remote(1), int)
    with cp.db.read() as conn:
        I = models.inputs  # noqa: E741
        last = conn.execute(
            select(I.c.worker_id).where(I.c.function_id == fid).order_by(I.c.id.desc()).limit(1)
        ).scalar_one()
    assert last not in parked


def test_a_worker_that_dies_while_parked_is_never_handed_inputs(app, control_plane):
    cp = control_plane.cp
    victim = basic.pid_of.remote(0)
    fid = basic.pid_of._function_id
    parked = _parked_workers(cp, fid)
    assert parked
    os.kill(victim, signal.SIGKILL)
    W = models.workers  # noqa: N806
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with cp.db.read() as conn:
            states = dict(conn.execute(select(W.c.id, W.c.state).where(W.c.id.in_(parked))).all())
        if all(st == "stopped" for st in states.values()):
            break
        time.sleep(0.05)
    assert set(states.values()) == {"stopped"}
    # Its claim handler re-parks every 1 s until it sees the worker stopped, then returns (and stops watching
    # the worker's drain key). Until it has returned, check on every look that it never parked the dead worker
    # again; wait for the return itself, not for a guessed time (a handler that never noticed ends at the
    # long-poll limit, 50 s, having re-parked all along).
    deadline = time.monotonic() + 90
    while True:
        with cp._lock:
            assert not [pc for pc in cp._parked.get(fid, ()) if pc.worker_id in parked]
        if not any(cp.hub._waiters.get(f"drain:{wid}") for wid in parked):
            break
        assert time.monotonic() < deadline, "the dead worker's claim handler never returned"
        time.sleep(0.01)
    assert basic.pid_of.remote(1) != victim  # the next input runs on a new worker


def test_claims_over_the_websocket_need_the_worker_s_own_token(app, control_plane):
    cp = control_plane.cp
    wid = "ta-not-this-worker"
    token = cp.tokens.create(scope="worker:someone-else")
    channel = Transport(control_plane.url, token, reconnect_timeout=2).channel(f"/v1/workers/{wid}/claim")
    with pytest.raises(AuthError):
        channel.call({"max": 1, "wait": 0})
    # over plain HTTP the same route answers the same
    with pytest.raises(AuthError):
        Transport(control_plane.url, token, reconnect_timeout=2).post(
            f"/v1/workers/{wid}/claim", {"max": 1, "wait": 0}
        )


def test_a_bad_claim_body_is_an_error_reply_and_the_socket_stays_usable(app, control_plane):
    from websockets.sync.client import connect

    cp = control_plane.cp
    assert basic.square.remote(2) == 4
    wid = _parked_workers(cp, basic.square._function_id)[0]
    token = cp.tokens.create(f"worker:{wid}-x", "test")  # a worker route answers only its worker's token
    url = control_plane.url.replace("http", "ws") + f"/v1/workers/{wid}-x/claim"
    with connect(url, additional_headers={"authorization": f"Bearer {token}"}) as ws:
        ws.send(msgpack.packb({"max": "lots"}))
        reply = msgpack.unpackb(ws.recv(timeout=10))
        assert reply["status"] == 400 and "Bad request body" in reply["error"]["message"]
        ws.send(msgpack.packb({"max": 1, "wait": 0}))
        reply = msgpack.unpackb(ws.recv(timeout=10))
        assert reply["status"] == 404  # an unknown worker, answered on the same socket


def test_workers_report_service_time(app, control_plane):
    cp = control_plane.cp
    t0 = time.time()
    assert list(basic.slow_identity.map(range(30))) == list(range(30))
    elapsed = time.time() - t0
    fid = basic.slow_identity._function_id
    deadline = time.monotonic() + 60
    while cp.workers.service_time_estimate(fid) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    est = cp.workers.service_time_estimate(fid)
    # slow_identity sleeps 2 ms: no input ran shorter. Each ran within the map, so none ran longer than the
    # whole map took; an estimate that counted idle or claim time, or used the wrong unit, would exceed it.
    # (A constant upper bound would be a claim about how busy the machine is.)
    assert est is not None and 0.002 <= est <= elapsed, (est, elapsed)


def _hand_out(
    cp_url: str, state: Path, name: str, prices: dict[str, float], floor: frozenset[str] = frozenset()
) -> list[str]:
    """On a control plane of its own (no reconciler to drain or scale these pretend workers; database at
    ``cp_url``), park one idle worker per price (in this order) on a function, then send one-input calls:
    which worker each call's input was handed to (checked against the database, which records it claimed)."""
    import asyncio

    from cloudmodal.server.app import default_settings
    from cloudmodal.server.service import ControlPlane, ParkedClaim

    basic.square.remote(2)
    spec = basic.square.spec.to_wire()
    cp = ControlPlane(default_settings(state, database_url=cp_url))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        cp.apps.create_app("ap-" + name, name, True)
        fid = cp.functions.create_function({"app_id": "ap-" + name, "name": name, "spec": spec})[
            "function_id"
        ]
        cp.set_floor(fid, floor)
        claims = {}
        for wid, price in prices.items():
            cp.workers.add_worker(wid, "ap-" + name, fid, price_per_hour=price)
            cp.workers.worker_ready(wid)
            claims[wid] = ParkedClaim(wid, fid, 1, loop, asyncio.Event())
            cp.park(claims[wid])
        got = []
        for i in range(len(prices)):
            cp.calls.create_call(f"ca-{name}-{i}", fid, "remote", [(0, None, b"x", None)])
            taken = [wid for wid, pc in claims.items() if pc.taken and wid not in got]
            assert len(taken) == 1
            got += taken
        with cp.db.read() as conn:
            I = models.inputs  # noqa: E741
            owners = dict(
                conn.execute(select(I.c.call_id, I.c.worker_id).where(I.c.function_id == fid)).all()
            )
        assert owners == {f"ca-{name}-{i}": wid for i, wid in enumerate(got)}  # written claimed by them
        return got
    finally:
        loop.call_soon_threadsafe(loop.stop)
        cp.db.dispose()


@pytest.fixture
def own_database(control_plane, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh database of the kind the module's control plane uses."""
    if control_plane.cp.db.is_sqlite:
        return f"sqlite:///{tmp_path / 'own.db'}"
    return request.getfixturevalue("new_postgres_database")()


def test_inputs_go_to_the_cheapest_parked_worker_first(app, own_database, tmp_path):
    """Among idle workers, the cheapest is handed the next input (the most recently parked among equals):
    the dearer ones stay idle, and the autoscaler stops the dearest idle workers first."""
    prices = {"ta-dear-1": 3.0, "ta-cheap": 1.0, "ta-dear-2": 3.0}
    got = _hand_out(own_database, tmp_path, "priced", prices)
    assert got == ["ta-cheap", "ta-dear-2", "ta-dear-1"]


def test_the_on_demand_floor_is_handed_inputs_before_cheaper_spot_workers(app, own_database, tmp_path):
    """A pool's min_on_demand workers are paid for whether they work or not: they take inputs first, so a
    spot worker is the one that goes idle (and the autoscaler stops the floor last)."""
    prices = {"ta-spot": 1.0, "ta-floor": 3.0, "ta-od-extra": 3.0}
    got = _hand_out(own_database, tmp_path, "floored", prices, floor=frozenset({"ta-floor"}))
    assert got == ["ta-floor", "ta-spot", "ta-od-extra"]
