"""The cost ledger (cloudmodal/server/ledger.py) and its reports (cost_report.py) on real databases (SQLite and
PostgreSQL), with worker rows at exact times: hour-bounded spans, idle time, each cloud's billing minimum and
increment, accrual written once however often it runs, and reports over ranges with partial hours equal to
the same sums taken span by span."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cloudmodal.server import models
from cloudmodal.server.app import default_settings
from cloudmodal.server.cost_report import CostReports, overlap, period_bounds
from cloudmodal.server.ledger import HOUR, SPAN, Ledger, hours_between
from cloudmodal.server.service import ControlPlane

W = models.workers
T0 = 1_800_000_000.0  # an hour boundary (1800000000 / 3600 = 500000)
H = 3600.0


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Any:
    plane = ControlPlane(default_settings(tmp_path / "cp", database_url=database_url))
    plane.apps.create_app("ap-1", "one", ephemeral=False)
    plane.apps.create_app("ap-2", "two", ephemeral=False)
    yield plane
    plane.db.dispose()


def worker(
    cp: ControlPlane,
    wid: str,
    *,
    app: str = "ap-1",
    launched: float,
    stopped: float | None = None,
    price: float = 36.0,
    market: str = "on-demand",
    cloud: str = "aws",
    on_demand: float | None = None,
    idle_since: float | None = None,
    gpu: str = "A10:2",
) -> None:
    with cp.db.write() as conn:
        conn.execute(
            W.insert().values(
                id=wid,
                app_id=app,
                function_id="fu-" + app,
                provider="sim",
                state="stopped" if stopped is not None else "ready",
                started_at=launched - 5,
                launched_at=launched,
                stopped_at=stopped,
                last_heartbeat=launched,
                idle_since=idle_since,
                market=market,
                price_per_hour=price,
                gpu=gpu,
                offer={
                    "cloud": cloud,
                    "region": "r",
                    "instance_type": "i",
                    "gpu": gpu,
                    "on_demand_per_hour": on_demand,
                },
            )
        )


def spans(cp: ControlPlane) -> list[dict[str, Any]]:
    with cp.db.read() as conn:
        return [dict(r) for r in conn.execute(select(SPAN).order_by(SPAN.c.worker_id, SPAN.c.t0)).mappings()]


def test_hours_between_and_overlap() -> None:
    assert hours_between(T0 - 10, T0 + 5) == [(T0 - 10, T0), (T0, T0 + 5)]
    assert hours_between(T0, T0) == []
    assert overlap(0, 10, 5, 20) == 0.5 and overlap(3, 3, 0, 5) == 1.0 and overlap(5, 5, 0, 5) == 0.0


def test_spans_split_at_hours_with_idle_time_and_the_billing_minimum(cp: ControlPlane) -> None:
    # aws: per second, 60 s minimum. Ran 1.25 s past a 40-minute stretch split over two hours.
    worker(cp, "w-long", launched=T0 - 1200.5, stopped=T0 + 1200.75, idle_since=T0 + 600.0)
    worker(cp, "w-short", launched=T0 + 10.0, stopped=T0 + 22.5)  # 12.5 s: billed 60 s
    worker(cp, "w-lambda", launched=T0 + 100.0, stopped=T0 + 161.0, cloud="lambda")  # 61 s: billed 120 s
    assert Ledger(cp).accrue(now=T0 + 3000) == 2 + 2 + 2
    got = {(s["worker_id"], s["kind"], s["t0"]): s for s in spans(cp)}
    first, second = got[("w-long", "compute", T0 - 1200.5)], got[("w-long", "compute", T0)]
    assert (first["t1"], first["seconds"], first["idle_seconds"]) == (T0, 1200.5, 0.0)
    assert (second["t1"], second["seconds"], second["idle_seconds"]) == (T0 + 1200.75, 1200.75, 600.75)
    assert ("w-long", "minimum", T0 + 1200.75) not in got  # ran past the minimum
    assert got[("w-short", "minimum", T0 + 22.5)]["seconds"] == pytest.approx(47.5)
    assert got[("w-lambda", "minimum", T0 + 161.0)]["seconds"] == pytest.approx(59.0)  # whole minutes
    for s in got.values():
        assert s["cost"] == pytest.approx(36.0 * s["seconds"] / 3600)
        assert s["gpu_count"] == 2
    # the rollup holds the same sums, per hour
    with cp.db.read() as conn:
        by_hour = dict(conn.execute(select(HOUR.c.hour, func.sum(HOUR.c.cost)).group_by(HOUR.c.hour)).all())
    assert by_hour[T0 - H] == pytest.approx(36.0 * 1200.5 / 3600)
    assert by_hour[T0] == pytest.approx(sum(s["cost"] for s in got.values() if s["t0"] >= T0))


def test_accrual_is_written_once_however_often_it_runs(cp: ControlPlane) -> None:
    worker(cp, "w-live", launched=T0)
    ledgers = [Ledger(cp) for _ in range(4)]
    threads = [threading.Thread(target=lg.accrue, kwargs={"now": T0 + 100}) for lg in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Ledger(cp).accrue(now=T0 + 100)  # again, same now: nothing new
    (s,) = spans(cp)
    assert (s["t0"], s["t1"]) == (T0, T0 + 100)
    Ledger(cp).accrue(now=T0 + 250)  # later: only what is new
    assert [(s["t0"], s["t1"]) for s in spans(cp)] == [(T0, T0 + 100), (T0 + 100, T0 + 250)]


def test_a_report_with_partial_hours_equals_the_spans_summed_one_by_one(cp: ControlPlane) -> None:
    worker(cp, "a", launched=T0 - 5000, stopped=T0 + 7300, price=10.0)
    worker(
        cp, "b", app="ap-2", launched=T0 - 100, stopped=T0 + 50, price=72.0, market="spot", on_demand=240.0
    )
    worker(cp, "c", launched=T0 + 3600 * 2 + 30, price=3.6)  # still running at "now": not accrued yet
    Ledger(cp).accrue(now=T0 + 7400)
    now = T0 + 9000.0
    since, until = T0 - 4321.5, T0 + 8000.25  # unaligned: both edges are partial hours
    report = CostReports(cp).report(by="app", since=since, until=until, now=now)
    expected = sum(s["cost"] * overlap(s["t0"], s["t1"], since, until) for s in spans(cp))
    expected += 3.6 * (until - (T0 + 7400)) / 3600  # c's time since the accrual, up to `until`
    assert report["total"]["cost"] == pytest.approx(expected, abs=1e-6)
    groups = {g["key"]: g for g in report["groups"]}
    assert groups["two"]["cost"] == pytest.approx(72.0 * 150 / 3600, abs=1e-6)  # past the minimum
    assert groups["two"]["spot_savings"] == pytest.approx((240.0 - 72.0) * 150 / 3600, abs=1e-6)
    assert report["running"]["per_hour"] == pytest.approx(3.6)
    # a whole-hour range reads the rollup only, and agrees with the spans
    whole = CostReports(cp).report(by="day", since=T0 - 2 * H, until=T0 + 2 * H, now=now)
    spans_sum = sum(s["cost"] * overlap(s["t0"], s["t1"], T0 - 2 * H, T0 + 2 * H) for s in spans(cp))
    assert whole["total"]["cost"] == pytest.approx(spans_sum, abs=1e-6)
    # a member who sees only app "two"
    scoped = CostReports(cp).report(by="app", since=since, until=until, now=now, visible={"two"})
    assert [g["key"] for g in scoped["groups"]] == ["two"]


def test_budget_periods_are_utc_calendar_periods() -> None:
    start, end = period_bounds("month", 1_798_761_600.0 + 86400 * 40)  # 2027-01-01 + 40 days -> February 2027
    assert (start, end) == (1_801_440_000.0, 1_803_859_200.0)
    start, end = period_bounds("day", 1_798_761_600.0 + 3600)
    assert (start, end) == (1_798_761_600.0, 1_798_761_600.0 + 86400)
    start, _ = period_bounds("week", 1_798_761_600.0)  # 2027-01-01 is a Friday: the week began Monday Dec 28
    assert start == 1_798_761_600.0 - 4 * 86400


def test_a_pruned_runs_costs_keep_their_names_and_its_workers_their_story(cp: ControlPlane) -> None:
    """Retention removes a stopped run's app, function and worker rows (retention._remove_app); the ledger
    keeps what it cost under its names, and each worker's life: launch, end, why it ended, what it cost."""
    from sqlalchemy import delete, update

    from cloudmodal.server.ledger import LAPP, LWORKER

    F = models.functions  # noqa: N806
    with cp.db.write() as conn:
        conn.execute(update(models.apps).where(models.apps.c.id == "ap-2").values(tags={"team": "ml"}))
        conn.execute(F.insert().values(id="fu-ap-2", app_id="ap-2", name="train", spec={}))
    worker(cp, "w-gone", app="ap-2", launched=T0, stopped=T0 + 600)
    with cp.db.write() as conn:
        conn.execute(update(W).where(W.c.id == "w-gone").values(stop_reason="scaled down: idle"))
    Ledger(cp).accrue(now=T0 + 700)
    with cp.db.write() as conn:  # what retention does to a stopped run
        for table in (W, F, models.apps):
            col = table.c.app_id if table is not models.apps else table.c.id
            conn.execute(delete(table).where(col == "ap-2"))
    report = CostReports(cp).report(by="function", since=T0 - H, until=T0 + H, now=T0 + 800)
    assert [g["key"] for g in report["groups"]] == ["two/train"]
    by_tag = CostReports(cp).report(by="tag:team", since=T0 - H, until=T0 + H, now=T0 + 800)
    assert [g["key"] for g in by_tag["groups"]] == ["ml"]
    with cp.db.read() as conn:
        (life,) = conn.execute(select(LWORKER)).mappings().all()
        assert conn.execute(select(LAPP.c.name)).scalars().all() == ["two"]
    assert (life["launched_at"], life["stopped_at"], life["stop_reason"]) == (
        T0,
        T0 + 600,
        "scaled down: idle",
    )
    assert life["billed_seconds"] == 600 and life["cost"] == pytest.approx(36.0 * 600 / 3600)
