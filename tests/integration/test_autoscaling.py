"""min_containers, max_containers, buffer_containers and scaledown_window hold under a bursty load."""

from __future__ import annotations

import threading
import time

import scaling_app
import scaling_gpu_app
from sqlalchemy import text
from support import sim_plane, start_server, use_server

from cloudmodal.client.session import run_app


def _live(cp, app_id: str, fn=None) -> tuple[int, int]:
    """(workers counted as capacity: starting+ready, all live incl. draining) of one function's pool."""
    with cp.db.read() as conn:
        rows = conn.execute(
            text(
                "select w.state from worker w join function f on f.id = w.function_id where w.app_id=:a and f.name=:n and w.state in ('starting','ready','draining')"
            ),
            {"a": app_id, "n": _name[0]},
        ).all()
    states = [r[0] for r in rows]
    return sum(s != "draining" for s in states), len(states)


def test_bounds_hold_under_bursty_load_local(tmp_path):
    handle = start_server(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        with use_server(handle):
            _bursty(handle, scaling_app.app, scaling_app.work)
    finally:
        handle.stop()


def test_bounds_hold_under_bursty_load_sim(tmp_path):
    with sim_plane(tmp_path, {"provisioning": {"delay_s": 0.3}}) as (handle, _sim):
        _bursty(handle, scaling_gpu_app.app, scaling_gpu_app.gpu_work)


_name = ["work"]


def _bursty(control_plane, app, fn):
    _name[0] = fn.spec.name
    cp = control_plane.cp
    samples: list[tuple[float, int, int, str]] = []
    phase = ["idle"]
    stop = threading.Event()
    with run_app(app, show_logs=False) as running:

        def sampler() -> None:
            while not stop.is_set():
                cap, live = _live(cp, running.app_id)
                samples.append((time.time(), cap, live, phase[0]))
                time.sleep(0.05)

        t = threading.Thread(target=sampler)
        t.start()
        try:
            # min_containers: a worker comes up with no load at all.
            deadline = time.time() + 20
            while _live(cp, running.app_id)[0] < 1 and time.time() < deadline:
                time.sleep(0.1)
            assert _live(cp, running.app_id)[0] >= 1
            # buffer_containers: one input in flight needs 1 worker; the buffer keeps 1 more ready.
            phase[0] = "light"
            assert fn.remote(1.5) == 1.5
            phase[0] = "cooldown"
            time.sleep(4.0)
            for _ in range(2):  # two bursts, far more inputs than max_containers can take at once
                phase[0] = "burst"
                assert list(fn.map([0.2] * 24)) == [0.2] * 24
                phase[0] = "cooldown"
                time.sleep(4.0)  # past scaledown_window (2 s)
            phase[0] = "end"
            time.sleep(0.3)
        finally:
            stop.set()
            t.join()
    burst = [s for s in samples if s[3] == "burst"]
    light = [s for s in samples if s[3] == "light"]
    assert max(s[1] for s in light) == 2  # 1 needed + 1 buffer
    assert max(s[1] for s in samples) <= 3  # max_containers is a hard cap on capacity
    assert max(s[1] for s in burst) == 3  # the burst used all of it
    assert min(s[1] for s in samples if s[3] != "idle") >= 1  # never below min_containers
    # scaledown_window: at the end of each cool-down only the floor (min) remains.
    ends = [s for s in samples if s[3] == "end"]
    assert ends and all(s[1] == 1 for s in ends)
