"""The estimates the reconciler passes the autoscaler: start-up times of recent workers, service time."""

from __future__ import annotations

from types import SimpleNamespace

from cloudmodal.server.estimates import StartupTimes
from cloudmodal.server.reconciler import Reconciler


def test_startup_estimate_is_the_median_of_recent_boots():
    times = StartupTimes(keep=4)
    assert not times.known("f") and times.estimate("f") is None
    times.seed("f", [])
    assert times.known("f") and times.estimate("f") is None

    def ready(wid: str, at: float, boot: float) -> None:
        times.observe("f", wid, at - boot, at)

    for i, boot in enumerate([100.0, 300.0, 120.0]):
        ready(f"w{i}", 1000.0 + i, boot)
    assert times.estimate("f") == 120.0
    ready("w3", 1010.0, 110.0)
    assert times.estimate("f") == 115.0  # even count: the mean of the middle two
    ready("w4", 1020.0, 90.0)  # keeps the 4 newest: w0 (100 s) drops out
    assert times.estimate("f") == 115.0
    ready("w5", 1030.0, 5_000.0)
    ready("w6", 1040.0, 5_000.0)
    assert times.estimate("f") == 2555.0  # 110, 90, 5000, 5000
    ready("w0", 1000.0, 100.0)  # a long-lived worker seen again after it dropped out: not a new sample
    assert times.estimate("f") == 2555.0


def test_startup_observations_are_taken_once_and_only_when_ready():
    times = StartupTimes()
    times.observe("f", "w1", 10.0, None)  # still starting
    assert times.estimate("f") is None
    times.observe("f", "w1", 10.0, 70.0)
    times.observe("f", "w1", 10.0, 70.0)  # seen again on the next tick
    times.observe("f", "w2", 50.0, 40.0)  # clock skew: ignored
    times.observe("g", "w9", 0.0, 5.0)
    assert times.estimate("f") == 60.0 and times.estimate("g") == 5.0


def _reconciler(cp) -> Reconciler:
    r = object.__new__(Reconciler)  # no threads, no providers: only the estimate helpers are used
    r.cp = cp
    r.startup_times = StartupTimes()
    return r


def test_service_time_is_the_control_plane_s_average_of_what_workers_report(tmp_path):
    from cloudmodal.server.service import ControlPlane, Settings

    cp = ControlPlane(Settings(database_url=f"sqlite:///{tmp_path / 'cp.db'}", state_dir=tmp_path))
    r = _reconciler(cp)
    assert r._service_time("f") is None  # nothing reported yet
    cp.workers.record_service("f", 10, 20.0)  # ten inputs, 2 s each
    assert r._service_time("f") == 2.0 and r._service_time("g") is None
    cp.workers.record_service(
        "f", cp.workers.SERVICE_HALF_LIFE, cp.workers.SERVICE_HALF_LIFE * 4.0
    )  # a half-life of 4 s inputs
    assert r._service_time("f") == 3.0  # halfway from 2 s to 4 s
    cp.workers.record_service("f", 1, 1000.0)  # one outlier barely moves it
    assert 3.0 < r._service_time("f") < 3.0 + 1000.0 * (1 - 0.5 ** (1 / cp.workers.SERVICE_HALF_LIFE)) + 1e-9
    cp.db.dispose()


def test_startup_time_reads_live_workers_after_seeding_from_the_database():
    class DB:
        reads = 0

        def read(self):
            DB.reads += 1
            rows = [("old1", 0.0, 200.0), ("old2", 0.0, 100.0)]  # newest first, as the query orders them

            class Conn:
                def __enter__(self):
                    return self

                def __exit__(self, *a):
                    return False

                def execute(self, _stmt):
                    return SimpleNamespace(all=lambda: rows)

            return Conn()

    r = _reconciler(SimpleNamespace(db=DB()))
    live = [
        SimpleNamespace(id="a", started_at=0.0, ready_at=None),
        SimpleNamespace(id="b", started_at=10.0, ready_at=400.0),
    ]
    assert r._startup_time("f", live) == 200.0  # median of 100, 200 (the database) and 390 (live)
    assert r._startup_time("f", live) == 200.0
    assert DB.reads == 1  # the database is read once per function
