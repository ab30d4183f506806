"""The cost ledger end to end on the simulated cloud: real control plane, real worker processes, spot
preemptions and an on-demand fallback; then `cloudmodal cost` (a real CLI process) against an independent
recomputation from the event log, and a budget that stops scale-up at its cap and lets it resume in the next
period.

The recomputation reads only events (each launch's price, market, on-demand price and time; each stop's time)
and applies the clouds' billing rules written out here again, so a mistake in the ledger's arithmetic, its
prices or its minimums shows as a difference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cost_app
from sqlalchemy import text
from support import sim_plane

from cloudmodal.client.session import run_app
from cloudmodal.pricing.offers import Offer
from cloudmodal.server.app import ServerHandle

D = "2026-01-01"
# Dear on purpose ($0.10 a second on demand): a cent is 0.1 s of a worker's time, so the comparison is tight.
OFFER = Offer("aws", "us-east-1", "use1-az1", "g5.xlarge", "A10", 1, 24, 4, 16, 360.0, 108.0, "test", D)
MINIMUM_S = {"aws": 60.0, "gcp": 60.0, "azure": 60.0, "lambda": 60.0}
INCREMENT_S = {"lambda": 60.0}


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(handle: ServerHandle, sql: str, **params: Any) -> list[Any]:
    with handle.cp.db.read() as conn:
        return list(conn.execute(text(sql), params).all())


def _all_billed(handle: ServerHandle, app_id: str) -> bool:
    return not _rows(
        handle,
        "select id from worker where app_id = :a and launched_at is not null and not billing_closed",
        a=app_id,
    )


def _recompute(events: list[dict[str, Any]]) -> dict[str, float]:
    """Cost and spot savings from the event log alone."""
    launched = {e["data"]["worker_id"]: e["data"] for e in events if e["kind"] == "worker.launched"}
    stopped = {
        e["data"]["worker_id"]: e["data"]["stopped_at"]
        for e in events
        if e["kind"] in ("worker.stopped", "worker.crashed") and "stopped_at" in (e["data"] or {})
    }
    cost = savings = 0.0
    for wid, d in launched.items():
        ran = stopped[wid] - d["launched_at"]
        cloud = d["offer"]["cloud"]
        billed = max(ran, MINIMUM_S.get(cloud, 0.0))
        inc = INCREMENT_S.get(cloud)
        if inc:
            billed = math.ceil(billed / inc) * inc
        cost += d["price_per_hour"] * billed / 3600
        if d["market"] == "spot":
            savings += (d["offer"]["on_demand_per_hour"] - d["price_per_hour"]) * billed / 3600
    return {"cost": cost, "savings": savings, "workers": len(launched)}


def _cli_report(handle: ServerHandle, *args: str) -> dict[str, Any]:
    env = dict(os.environ, CLOUDMODAL_SERVER_URL=handle.url, CLOUDMODAL_TOKEN=handle.token)
    p = subprocess.run(
        [sys.executable, "-m", "cloudmodal.cli.main", "cost", *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def test_the_report_equals_a_recomputation_from_the_event_log(tmp_path: Path) -> None:
    spot_settings = json.dumps(
        {
            "probe_interval_s": 60.0,
            "block_capacity_s": 60.0,
            "replace_interval_s": 0.5,
            "failure_threshold": 2,
        }
    )
    with sim_plane(tmp_path, {}, offers=[OFFER], CLOUDMODAL_SPOT_SETTINGS=spot_settings) as (handle, sim):
        with run_app(cost_app.app, show_logs=False) as running:
            app_id = running.app_id

            def live(market: str) -> list[str]:
                return [
                    r[0]
                    for r in _rows(
                        handle,
                        "select id from worker where market=:m and state='ready' and app_id=:a",
                        m=market,
                        a=app_id,
                    )
                ]

            assert cost_app.spot_then_on_demand.remote(1) == 1
            (spot,) = wait_for(lambda: live("spot"), what="a spot worker")
            sim.set_capacity({"market": "spot"}, False)  # spot runs out and the worker is reclaimed
            sim.preempt(spot, notice_s=0.2)
            wait_for(
                lambda: _rows(handle, "select 1 from worker where id=:w and state='stopped'", w=spot),
                what="the preempted worker to stop",
            )
            assert cost_app.spot_then_on_demand.remote(2) == 2  # served on demand: the pool fell back
            wait_for(lambda: live("on-demand"), what="an on-demand worker")
        wait_for(lambda: _all_billed(handle, app_id), what="every worker's billing to close")
        events = handle.cp.activity.events(app_id, limit=10_000)
        report = _cli_report(handle, "cost-app", "--since", "1d")
        by_market = {
            g["key"]: g for g in _cli_report(handle, "cost-app", "--since", "1d", "--by", "market")["groups"]
        }
        by_tag = _cli_report(handle, "--since", "1d", "--by", "tag:team")["groups"]
    kinds = {e["kind"] for e in events}
    # the spot worker was preempted, spot launches failed and the pool fell back to on-demand
    assert {"worker.preempted", "launch.failed"} <= kinds, kinds
    expected = _recompute(events)
    assert expected["workers"] >= 2
    total = report["total"]
    assert abs(total["cost"] - expected["cost"]) < 0.005, (total, expected)  # to the cent
    assert abs(total["spot_savings"] - expected["savings"]) < 0.005, (total, expected)
    assert total["spot_savings"] > 0 and total["minimum_cost"] > 0
    assert set(by_market) == {"spot", "on-demand"}
    assert abs(sum(g["cost"] for g in by_market.values()) - total["cost"]) < 1e-6
    assert [(g["key"], round(g["cost"], 6)) for g in by_tag] == [("research", round(total["cost"], 6))]
    assert report["running"]["per_hour"] == 0  # everything stopped


def test_a_budget_stops_scale_up_at_its_cap_and_resumes_in_the_next_period(tmp_path: Path) -> None:
    with sim_plane(tmp_path, {}, offers=[OFFER]) as (handle, _sim):
        with run_app(cost_app.capped, show_logs=False) as running:
            app_id = running.app_id
            # One worker: $360/h for at least a minute (the billing minimum) is $6, past the $5 cap.
            assert cost_app.under_budget.remote(1) == 1
            wait_for(
                lambda: _rows(handle, "select 1 from worker where app_id=:a and state='stopped'", a=app_id),
                what="the idle worker to be scaled down",
            )
            wait_for(lambda: _all_billed(handle, app_id), what="its billing to close")
            call = cost_app.under_budget.spawn(2)  # wants a worker: the budget says no
            wait_for(
                lambda: [e for e in handle.cp.activity.events(app_id) if e["kind"] == "budget.exceeded"],
                what="the budget's refusal",
            )
            launched = [e for e in handle.cp.activity.events(app_id) if e["kind"] == "worker.launched"]
            assert len(launched) == 1
            told = wait_for(  # the caller is told, in the app's logs
                lambda: [r["text"] for r in handle.cp.activity.logs(app_id) if "is spent" in r["text"]],
                what="the budget's line in the app's logs",
            )
            assert told[0].startswith("budget: not starting")
            report = _cli_report(handle, "capped-app")
            (b,) = report["budgets"]
            assert b["max_total"] == 5.0 and b["spent"] >= 6.0 and b["headroom"] < 0
            # The next month: the period's spending starts again, and the waiting call gets its worker.
            budgets = handle.reconciler.budgets
            budgets.clock = lambda: time.time() + 32 * 86400.0
            assert call.get(timeout=120) == 2
            kinds = [e["kind"] for e in handle.cp.activity.events(app_id)]
            assert kinds.count("worker.launched") == 2 and "budget.resumed" in kinds
