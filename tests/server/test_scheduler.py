"""Schedules (cloudmodal/server/scheduler.py): the pure tick and missed-tick decisions as tables, then the
scheduler on real databases (SQLite and PostgreSQL) with its clock passed in: deploy, fire once per tick,
race another control plane, skip what was missed, follow redeploys and stops."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloudmodal import Cron, Period
from cloudmodal.server import models
from cloudmodal.server.app import default_settings
from cloudmodal.server.scheduler import (
    COUNTED_SKIPS,
    LISTED_SKIPS,
    NO_ARGS,
    Plan,
    S,
    Scheduler,
    first_tick,
    next_tick,
    plan,
)
from cloudmodal.server.service import ControlPlane
from cloudmodal.spec import FunctionSpec

A0 = 1_000_000.0  # an anchor (a deploy), epoch seconds


def ts(iso_utc: str) -> float:
    return datetime.fromisoformat(iso_utc).replace(tzinfo=UTC).timestamp()


# -- pure ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "anchor", "after", "expected"),
    [
        # a Period counts from its anchor (the deploy), strictly after `after`
        (Period(seconds=2), A0, A0, A0 + 2),
        (Period(seconds=2), A0, A0 + 1.5, A0 + 2),
        (Period(seconds=2), A0, A0 + 2, A0 + 4),
        (Period(seconds=2), A0, A0 - 100, A0 + 2),  # before the anchor: the first tick
        (Period(minutes=90), A0, A0 + 3 * 5400 + 1, A0 + 4 * 5400),
        # calendar months from Jan 31: Feb 28, then Mar 31 (not Mar 28: no drift)
        (Period(months=1), ts("2026-01-31T12:00:00"), ts("2026-02-28T12:00:00"), ts("2026-03-31T12:00:00")),
        # cron in UTC, and on a timezone's wall clock across its DST change
        (Cron("*/5 * * * *"), 0.0, ts("2026-06-01T12:03:10"), ts("2026-06-01T12:05:00")),
        (Cron("*/5 * * * *"), 0.0, ts("2026-06-01T12:05:00"), ts("2026-06-01T12:10:00")),
        (
            Cron("0 9 * * *", timezone="America/New_York"),
            0.0,
            ts("2026-03-07T15:00:00"),  # 10:00 EST (UTC-5)
            ts("2026-03-08T13:00:00"),  # 09:00 EDT (UTC-4): DST began at 02:00 that day
        ),
        (
            Cron("0 9 * * *", timezone="America/New_York"),
            0.0,
            ts("2026-01-10T15:00:00"),
            ts("2026-01-11T14:00:00"),
        ),
    ],
)
def test_next_tick(schedule: Period | Cron, anchor: float, after: float, expected: float) -> None:
    assert next_tick(schedule, anchor, after) == expected


def test_first_tick_counts_from_the_deploy() -> None:
    assert first_tick(Period(hours=1), A0) == A0 + 3600
    assert first_tick(Period(seconds=2), A0 + 0.7) == A0 + 2  # counted from the whole second
    assert first_tick(Cron("0 * * * *"), ts("2026-06-01T12:00:00")) == ts("2026-06-01T13:00:00")


P10 = Period(seconds=10)


@pytest.mark.parametrize(
    ("due", "now", "grace", "expected"),
    [
        # not due yet: nothing
        (A0 + 10, A0 + 5, 300, Plan(None, A0 + 10)),
        # on time, and a little late: the tick fires, the next is one period on
        (A0 + 10, A0 + 10, 300, Plan(A0 + 10, A0 + 20)),
        (A0 + 10, A0 + 19.9, 300, Plan(A0 + 10, A0 + 20)),
        # several missed within the grace: the latest fires (late), the older ones are skipped
        (A0 + 10, A0 + 35, 300, Plan(A0 + 30, A0 + 40, (A0 + 10, A0 + 20), 2)),
        # missed past the grace: only the latest within it fires, every older one is skipped
        (A0 + 10, A0 + 1000, 300, Plan(A0 + 1000, A0 + 1010, tuple(A0 + 10 * k for k in range(1, 100)), 99)),
        # nothing within the grace: nothing fires, every due tick is skipped, the next is after now
        (A0 + 10, A0 + 38, 5, Plan(None, A0 + 40, (A0 + 10, A0 + 20, A0 + 30), 3)),
        # a tick exactly grace old is too old
        (A0 + 10, A0 + 15, 5, Plan(None, A0 + 20, (A0 + 10,), 1)),
    ],
)
def test_missed_ticks_policy(due: float, now: float, grace: float, expected: Plan) -> None:
    assert plan(P10, A0, due, now, grace) == expected


def test_a_long_outage_is_counted_up_to_a_bound_and_listed_shorter() -> None:
    got = plan(Period(seconds=1), A0, A0 + 1, A0 + 100_000, grace_s=0.5)
    assert got.fire_at == A0 + 100_000 and got.next_fire_at == A0 + 100_001
    assert got.skipped_count == COUNTED_SKIPS and got.skipped_more
    assert got.skipped == tuple(A0 + k for k in range(1, LISTED_SKIPS + 1))


def test_cron_missed_ticks_follow_the_wall_clock() -> None:
    hourly = Cron("0 * * * *", timezone="Asia/Kolkata")  # UTC+5:30: ticks at :30 UTC
    due = ts("2026-06-01T10:30:00")
    got = plan(hourly, 0.0, due, ts("2026-06-01T13:45:00"), grace_s=3600)
    assert got == Plan(
        ts("2026-06-01T13:30:00"),
        ts("2026-06-01T14:30:00"),
        (ts("2026-06-01T10:30:00"), ts("2026-06-01T11:30:00"), ts("2026-06-01T12:30:00")),
        3,
    )


# -- on real databases, with the clock passed in ------------------------------------------------------------------
def _plane(tmp_path: Path, url: str, name: str = "cp") -> ControlPlane:
    return ControlPlane(default_settings(tmp_path / name, database_url=url))


def _deploy(
    cp: ControlPlane, schedules: dict[str, Any], app: str = "sched", app_id: str = "ap-sched"
) -> dict[str, str]:
    """Deploy (or redeploy) an app whose functions have these schedules (None: none); function ids by name."""
    got = cp.apps.create_app(app_id, app, ephemeral=False)
    ids = {}
    for name, sched in schedules.items():
        spec = FunctionSpec(name=name, module="m", qualname=name, schedule=sched.to_wire() if sched else None)
        ids[name] = cp.functions.create_function({"app_id": got["id"], "name": name, "spec": spec.to_wire()})[
            "function_id"
        ]
    cp.apps.record_deployment(got["id"], list(schedules))
    return ids


def _row(cp: ControlPlane, fid: str) -> Any:
    with cp.db.read() as conn:
        return conn.execute(select(S).where(S.c.function_id == fid)).first()


def _events(cp: ControlPlane, kind: str) -> list[Any]:
    E = models.events  # noqa: N806
    with cp.db.read() as conn:
        return list(conn.execute(select(E).where(E.c.kind == kind).order_by(E.c.id)).all())


def _schedule_calls(cp: ControlPlane) -> list[Any]:
    CA, I = models.calls, models.inputs  # noqa: N806, E741
    with cp.db.read() as conn:
        return list(
            conn.execute(
                select(CA.c.id, CA.c.function_id, CA.c.created_by, I.c.args, I.c.state)
                .select_from(CA.join(I, I.c.call_id == CA.c.id))
                .where(CA.c.kind == "schedule")
            ).all()
        )


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Any:
    plane = _plane(tmp_path, database_url)
    yield plane
    plane.db.dispose()


def test_a_deploy_schedules_and_each_tick_fires_once(cp: ControlPlane) -> None:
    ids = _deploy(cp, {"tick": Period(seconds=10), "plain": None})
    row = _row(cp, ids["tick"])
    assert _row(cp, ids["plain"]) is None
    assert row.next_fire_at == row.anchor + 10
    t0 = row.anchor
    sched = Scheduler(cp)
    assert sched.run_due(t0 + 9.9) == []
    (fired,) = sched.run_due(t0 + 10.2)
    assert (fired.tick, fired.skipped) == (t0 + 10, 0)
    assert sched.run_due(t0 + 10.3) == []  # the same tick, looked at again
    assert Scheduler(cp).run_due(t0 + 10.4) == []  # ...and by a fresh scheduler (a restart)
    (second,) = Scheduler(cp).run_due(t0 + 20.1)
    assert second.tick == t0 + 20
    calls = _schedule_calls(cp)
    assert fired.call_id is not None and second.call_id is not None
    assert sorted(c.id for c in calls) == sorted([fired.call_id, second.call_id])
    assert {(c.function_id, c.created_by, c.args, c.state) for c in calls} == {
        (ids["tick"], "schedule", NO_ARGS, 0)
    }
    ev = _events(cp, "schedule.fired")
    assert [(e.data["tick"], e.data["call_id"]) for e in ev] == [
        (t0 + 10, fired.call_id),
        (t0 + 20, second.call_id),
    ]
    assert [e.kind for e in _events(cp, "schedule.set")] == ["schedule.set"]
    assert cp.calls.call_row(fired.call_id)["kind"] == "schedule"  # a normal call, looked up by id


def test_a_stale_read_never_fires_twice(cp: ControlPlane, database_url: str, tmp_path: Path) -> None:
    """Negative control of the compare-and-swap: two control planes holding the same row (both read it due)
    both try to fire it; only the first creates a call."""
    ids = _deploy(cp, {"tick": Period(seconds=10)})
    stale = _row(cp, ids["tick"])
    other = _plane(tmp_path, database_url, "other")
    try:
        now = stale.anchor + 10.5
        assert Scheduler(cp).fire(stale, now) is not None
        assert Scheduler(other).fire(stale, now) is None
        assert len(_schedule_calls(cp)) == 1
    finally:
        other.db.dispose()


SCHEDULES = [
    pytest.param(Period(seconds=10), id="period"),
    pytest.param(Cron("*/5 * * * *", timezone="Europe/Berlin"), id="cron"),
]


def _grid(schedule: Period | Cron, anchor: float, first: float, n: int) -> list[float]:
    ticks = [first]
    while len(ticks) < n:
        ticks.append(next_tick(schedule, anchor, ticks[-1]))
    return ticks


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_two_control_planes_racing_fire_each_tick_once(
    cp: ControlPlane, database_url: str, tmp_path: Path, schedule: Period | Cron
) -> None:
    """Two control planes on one database (two processes' worth: engines and schedulers of their own) look at
    every tick at the same moment, as two leaders would: each tick of each function fires once."""
    ids = _deploy(cp, {"a": schedule, "b": schedule})
    row = _row(cp, ids["a"])
    ticks = _grid(schedule, row.anchor, row.next_fire_at, 12)
    other = _plane(tmp_path, database_url, "other")
    fired: list[Any] = []

    def race(plane: ControlPlane, now: float, barrier: threading.Barrier) -> None:
        s = Scheduler(plane)
        barrier.wait()
        fired.extend(s.run_due(now))

    try:
        for tick in ticks:
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=race, args=(p, tick + 0.5, barrier)) for p in (cp, other)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        by_tick = Counter((f.function_id, f.tick) for f in fired)
        assert by_tick == Counter({(fid, t): 1 for fid in ids.values() for t in ticks})
        assert len(_schedule_calls(cp)) == 24
        assert Counter((e.function_id, e.data["tick"]) for e in _events(cp, "schedule.fired")) == by_tick
    finally:
        other.db.dispose()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_restart_fires_each_tick_once(database_url: str, tmp_path: Path, schedule: Period | Cron) -> None:
    """A control plane fires some ticks and goes; a new one on the same database (its own engine, a fresh
    scheduler) goes on after an outage of three ticks: every tick is fired or skipped, once."""
    first_cp = _plane(tmp_path, database_url, "before")
    ids = _deploy(first_cp, {"tick": schedule})
    row = _row(first_cp, ids["tick"])
    ticks = _grid(schedule, row.anchor, row.next_fire_at, 10)
    before = Scheduler(first_cp)
    for tick in ticks[:4]:
        before.run_due(tick + 0.2)
        before.run_due(tick + 0.4)  # looked at twice: once is all it fires
    first_cp.db.dispose()
    after_cp = _plane(tmp_path, database_url, "after")
    try:
        after = Scheduler(after_cp)
        for tick in ticks[7:]:  # down across ticks 4, 5 and 6: back just after 7
            after.run_due(tick + 0.2)
        fired = [e.data["tick"] for e in _events(after_cp, "schedule.fired")]
        skipped = [t for e in _events(after_cp, "schedule.skipped") for t in e.data["ticks"]]
        assert fired == ticks[:4] + ticks[7:]
        assert skipped == ticks[4:7]
        assert len(_schedule_calls(after_cp)) == len(fired)
    finally:
        after_cp.db.dispose()


def test_missed_ticks_are_skipped_with_an_event_and_the_latest_fires(cp: ControlPlane) -> None:
    ids = _deploy(cp, {"tick": Period(seconds=10)})
    t0 = _row(cp, ids["tick"]).anchor
    (fired,) = Scheduler(cp, grace_s=300).run_due(t0 + 43)  # down from before t0+10 until t0+43
    assert (fired.tick, fired.skipped) == (t0 + 40, 3)
    (skipped,) = _events(cp, "schedule.skipped")
    assert skipped.data["ticks"] == [t0 + 10, t0 + 20, t0 + 30] and skipped.data["count"] == 3
    assert "3 missed run(s)" in skipped.message
    assert _row(cp, ids["tick"]).next_fire_at == t0 + 50
    # down past the grace: nothing fires late, everything missed is reported
    assert Scheduler(cp, grace_s=5).run_due(t0 + 78) == [
        type(fired)(ids["tick"], fired.app_id, None, None, 3)
    ]
    assert len(_schedule_calls(cp)) == 1
    assert _row(cp, ids["tick"]).next_fire_at == t0 + 80


def test_redeploys_keep_or_restart_schedules_and_a_stop_removes_them(cp: ControlPlane) -> None:
    ids = _deploy(cp, {"tick": Period(seconds=10), "other": Cron("0 * * * *")})
    first = _row(cp, ids["tick"])
    _deploy(cp, {"tick": Period(seconds=10), "other": Cron("0 * * * *")}, app_id="ap-redeploy-1")
    assert _row(cp, ids["tick"]) == first  # unchanged: its ticks go on from the first deploy
    _deploy(cp, {"tick": Period(seconds=30), "other": None}, app_id="ap-redeploy-2")
    changed = _row(cp, ids["tick"])
    assert changed.schedule["seconds"] == 30 and changed.next_fire_at == changed.anchor + 30
    assert changed.anchor >= first.anchor
    assert _row(cp, ids["other"]) is None
    assert [e.kind for e in _events(cp, "schedule.removed")] == ["schedule.removed"]
    # a deploy that leaves the function out unschedules it too
    _deploy(cp, {"plain": None}, app_id="ap-redeploy-3")
    assert _row(cp, ids["tick"]) is None
    _deploy(cp, {"tick": Period(seconds=10)}, app_id="ap-redeploy-4")
    assert _row(cp, ids["tick"]) is not None
    pools = {p["name"]: p for p in cp.apps.list_apps()[0]["pools"]}
    assert pools["tick"]["schedule"] == {
        "next_run_at": _row(cp, ids["tick"]).next_fire_at,
        "schedule": "Period(seconds=10)",
        "last_run_at": None,
        "last_call_id": None,
    }
    assert pools["plain"]["schedule"] is None
    cp.apps.stop_app(cp.apps.find_app("sched")["id"])
    assert _row(cp, ids["tick"]) is None
    assert Scheduler(cp).run_due(first.anchor + 10_000) == []


def test_an_ephemeral_run_does_not_schedule(cp: ControlPlane) -> None:
    """As on Modal: only deployed apps' schedules run."""
    app = cp.apps.create_app("ap-eph", "eph", ephemeral=True)
    spec = FunctionSpec(name="tick", module="m", qualname="tick", schedule=Period(seconds=1).to_wire())
    fid = cp.functions.create_function({"app_id": app["id"], "name": "tick", "spec": spec.to_wire()})[
        "function_id"
    ]
    assert _row(cp, fid) is None
    cp.apps.record_deployment(app["id"], ["tick"])  # not what a run does, but the API would take it
    assert _row(cp, fid) is None


def test_a_row_that_outlived_its_app_is_dropped_not_fired(cp: ControlPlane) -> None:
    ids = _deploy(cp, {"tick": Period(seconds=10)})
    row = _row(cp, ids["tick"])
    F = models.functions  # noqa: N806
    with cp.db.write() as conn:  # the function stopped without its app's stop (written around the service)
        conn.execute(F.update().where(F.c.id == ids["tick"]).values(state="stopped"))
    assert Scheduler(cp).run_due(row.anchor + 11) == []
    assert _row(cp, ids["tick"]) is None and _schedule_calls(cp) == []


def test_a_broken_row_does_not_stop_the_others(cp: ControlPlane) -> None:
    ids = _deploy(cp, {"tick": Period(seconds=10)})
    row = _row(cp, ids["tick"])
    with cp.db.write() as conn:  # a stored form this version cannot read (written around the service)
        conn.execute(
            S.insert().values(
                function_id="fu-broken",
                app_id=row.app_id,
                schedule={"type": "lunar"},
                next_fire_at=row.anchor,
            )
        )
    (fired,) = Scheduler(cp).run_due(row.anchor + 10.5)
    assert fired.function_id == ids["tick"]
    pools = {p["function_id"]: p for p in cp.apps.list_apps()[0]["pools"]}
    assert pools[ids["tick"]]["schedule"]["last_call_id"] == fired.call_id
    assert pools[ids["tick"]]["schedule"]["last_run_at"] == row.anchor + 10


def test_two_deploys_at_once_on_postgresql_do_not_collide(new_postgres_database: Any, tmp_path: Path) -> None:
    """Deploy 1 is mid-transaction (its schedule row written, not committed) when deploy 2 of the same app
    records its deployment: deploy 2 waits for deploy 1 (the app row is locked) and then finds the row,
    instead of inserting a second one and failing on the key when deploy 1 commits."""
    from sqlalchemy import text

    from cloudmodal.server.scheduler import sync_app_schedules

    cp = _plane(tmp_path, new_postgres_database())
    try:
        ids = _deploy(cp, {"plain": None})  # the app exists; now a scheduled function joins it
        spec = FunctionSpec(name="tick", module="m", qualname="tick", schedule=P10.to_wire())
        fid = cp.functions.create_function({"app_id": "ap-sched", "name": "tick", "spec": spec.to_wire()})[
            "function_id"
        ]
        first = cp.db.engine.connect()
        tx = first.begin()
        first.execute(select(models.apps.c.id).where(models.apps.c.id == "ap-sched").with_for_update())
        sync_app_schedules(first, "ap-sched", ["plain", "tick"], A0)  # deploy 1's work, uncommitted
        outcome: dict[str, Any] = {}

        def second() -> None:
            try:
                outcome["version"] = cp.apps.record_deployment("ap-sched", ["plain", "tick"])
            except Exception as e:
                outcome["error"] = e

        t = threading.Thread(target=second)
        t.start()
        # autocommit: PostgreSQL keeps one pg_stat_activity snapshot for a whole transaction, so a probe in
        # one transaction would never see a wait that began after its first look
        with cp.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
            blocker = first.execute(text("SELECT pg_backend_pid()")).scalar()
            waiting = 0
            for _ in range(1200):  # deploy 2 waits on deploy 1's lock
                waiting = probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND :blocker = ANY(pg_blocking_pids(pid))"
                    ),
                    {"blocker": blocker},
                ).scalar()
                if waiting or not t.is_alive():
                    break
                threading.Event().wait(0.05)
            assert waiting, f"deploy 2 never waited on deploy 1: {outcome}"
        tx.commit()
        first.close()
        t.join(60)
        assert "error" not in outcome, outcome
        assert _row(cp, fid) is not None and _row(cp, ids["plain"]) is None
    finally:
        cp.db.dispose()
