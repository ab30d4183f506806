"""Spot-aware pools on the simulated cloud: placement with failover, preemptions, spot fallback and return.

Real control plane, real worker processes; the `sim` provider decides capacity, delays and preemptions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import sim_app
from sqlalchemy import text
from support import DL, OFFERS, A, B, C, sim_plane  # noqa: F401

from cloudmodal.client.session import run_app
from cloudmodal.server.app import ServerHandle
from cloudmodal.server.reconciler import Reconciler


def events(handle: ServerHandle, app_id: str, kinds: tuple[str, ...] | None = None) -> list[dict]:
    return [e for e in handle.cp.activity.events(app_id, limit=10_000) if kinds is None or e["kind"] in kinds]


def wait_for(pred: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


LAUNCH_KINDS = ("launch.failed", "worker.launched")


def test_live_signals_keep_placement_off_offers_out_of_capacity(tmp_path):
    """When the cloud's live signals show an outage, placement skips those offers: nothing is tried there."""
    scenario = {"capacity": [{"match": {"zone": "use1-az1"}, "mode": "none"}]}
    with sim_plane(tmp_path, scenario) as (handle, _sim):
        with run_app(sim_app.app, show_logs=False) as running:
            assert sim_app.on_demand_fallback_list.remote(7) == 7
            evs = events(handle, running.app_id, LAUNCH_KINDS)
            ranked = events(handle, running.app_id, ("placement.ranked",))
    assert [e["kind"] for e in evs] == ["worker.launched"]
    assert "aws usw2-az1 g5.xlarge A10 on-demand $1.10/h" in evs[0]["message"]
    assert "use1-az1" not in ranked[0]["message"] and "1) aws usw2-az1" in ranked[0]["message"]


@pytest.mark.parametrize(
    "unavailable, expect_failed, expect_launched",
    [
        ([], [], "aws use1-az1 g5.xlarge A10 on-demand $1.00/h"),  # cheapest of tier 1
        (
            ["use1-az1"],
            ["aws use1-az1 g5.xlarge"],
            "aws usw2-az1 g5.xlarge A10 on-demand $1.10/h",
        ),  # next in tier
        (
            ["use1-az1", "usw2-az1", "us-east-1"],
            ["aws use1-az1 g5.xlarge", "aws usw2-az1 g5.xlarge", "lambda us-east-1 gpu_1x_a10"],
            "gcp us-central1-a g2-standard-4 L4 on-demand $0.80/h",
        ),  # tier 2
    ],
    ids=["cheapest-first", "next-in-tier", "next-tier"],
)
def test_failover_walks_the_tier_then_the_next_tier(tmp_path, unavailable, expect_failed, expect_launched):
    scenario = {
        "capacity": [
            {"match": {"zone": z} if z != "us-east-1" else {"cloud": "lambda"}, "mode": "none"}
            for z in unavailable
        ],
        "signals": False,  # the cloud's live signals do not show the outage: launches find it
    }
    with sim_plane(tmp_path, scenario) as (handle, _sim):
        with run_app(sim_app.app, show_logs=False) as running:
            assert sim_app.on_demand_fallback_list.remote(7) == 7
            evs = events(handle, running.app_id, LAUNCH_KINDS)
            ranked = events(handle, running.app_id, ("placement.ranked",))
    # The placement decision is visible too: tier 1 cheapest first, tier 2 after it.
    assert (
        ranked
        and "4 candidates" in ranked[0]["message"]
        and "1) aws use1-az1 g5.xlarge A10 on-demand $1.00/h" in ranked[0]["message"]
    )
    first_launch = next(i for i, e in enumerate(evs) if e["kind"] == "worker.launched")
    failed = [e["message"] for e in evs[:first_launch]]
    assert len(failed) == len(expect_failed), failed
    for msg, where in zip(failed, expect_failed, strict=True):
        assert msg.startswith(where) and (
            "InsufficientInstanceCapacity" in msg or "insufficient-capacity" in msg
        ), msg
    assert expect_launched in evs[first_launch]["message"]
    assert evs[first_launch]["data"]["offer"]["instance_type"] in expect_launched


def test_map_survives_spot_preemptions_without_losing_or_retrying(tmp_path):
    scenario = {
        "preemption": [{"match": {"market": "spot"}, "every_s": 2.0, "jitter_s": 0.5, "notice_s": 0.5}]
    }
    n = 5000
    with sim_plane(tmp_path, scenario) as (handle, _sim):
        with run_app(sim_app.app, show_logs=False) as running:
            results = list(sim_app.spot_work.map(range(n)))
            evs = events(handle, running.app_id)
            with handle.cp.db.read() as conn:
                attempts, crashes = conn.execute(
                    text("select coalesce(sum(attempts),0), coalesce(sum(crashes),0) from input")
                ).one()
                finals = conn.execute(
                    text("select count(*), count(distinct input_id) from output where gen_index = -1")
                ).one()
                markets = {r[0] for r in conn.execute(text("select market from worker"))}
    assert results == list(range(n))  # every input, exactly once, in order
    assert finals[0] == finals[1] == n
    assert attempts == 0  # preemptions never consume the user's Retries
    preempted = [e for e in evs if e["kind"] == "worker.preempted"]
    assert len(preempted) >= 1, [e["kind"] for e in evs]
    assert "spot" in markets
    _ = crashes


def test_spot_fallback_to_on_demand_and_back(tmp_path):
    spot_settings = json.dumps(
        {"probe_interval_s": 1.0, "block_capacity_s": 1.0, "replace_interval_s": 0.5, "failure_threshold": 2}
    )
    with sim_plane(tmp_path, {}, CLOUDMODAL_SPOT_SETTINGS=spot_settings) as (handle, sim):
        with run_app(sim_app.app, show_logs=False) as running:
            cp = handle.cp

            def live(market: str) -> list[str]:
                with cp.db.read() as conn:
                    return [
                        r[0]
                        for r in conn.execute(
                            text("select id from worker where market=:m and state='ready'"), {"m": market}
                        )
                    ]

            assert sim_app.spot_or_not.remote(1) == 1
            first = wait_for(lambda: live("spot"), what="a spot worker")
            # Spot capacity disappears everywhere, and the spot worker is reclaimed.
            sim.set_capacity({"market": "spot"}, False)
            sim.preempt(first[0], notice_s=0.2)

            def stopped() -> bool:
                with cp.db.read() as conn:
                    return (
                        conn.execute(
                            text("select state from worker where id=:w"), {"w": first[0]}
                        ).scalar_one()
                        == "stopped"
                    )

            wait_for(stopped, what="the preempted worker to go")
            assert sim_app.spot_or_not.remote(2) == 2
            try:
                wait_for(lambda: live("on-demand"), what="an on-demand worker")
            except AssertionError:
                print("\n".join(f"{e['kind']}: {e['message']}" for e in events(handle, running.app_id)))
                raise
            kinds = [e["kind"] for e in events(handle, running.app_id)]
            assert "pool.spot_fallback" in kinds
            # The pool's row says so (`cloudmodal app list`), and a control plane taking over would know it.
            fid = sim_app.spot_or_not._function_id

            def pool() -> dict:
                apps = running.session.transport.get("/v1/apps")
                return next(p for a in apps for p in a["pools"] if p["function_id"] == fid)

            wait_for(lambda: pool()["fallen_back"], what="the pool row to show the fallback")
            assert (
                pool()["fallback_reason"] in ("launch failures", "preemptions")
                and pool()["desired"] is not None
            )
            successor = Reconciler(cp, handle.reconciler.providers, handle.url)  # never started
            assert successor._market(fid).fallen_back
            # Spot comes back: a probe finds it, and the on-demand worker is replaced by a spot one.
            sim.set_capacity({"market": "spot"}, True)
            wait_for(lambda: not live("on-demand") and live("spot"), timeout=40, what="the pool back on spot")
            assert sim_app.spot_or_not.remote(3) == 3
            kinds = [e["kind"] for e in events(handle, running.app_id)]
            assert "pool.spot_restored" in kinds
            wait_for(lambda: not pool()["fallen_back"], what="the pool row to show spot again")


def test_min_on_demand_keeps_an_on_demand_floor_beside_spot(tmp_path):
    with sim_plane(tmp_path, {}) as (handle, _sim):
        with run_app(sim_app.app, show_logs=False):
            assert list(sim_app.floor_work.map(range(8))) == list(range(8))
            with handle.cp.db.read() as conn:
                rows = conn.execute(
                    text(
                        "select w.market, w.id, w.state from worker w join function f on f.id = w.function_id where f.name = 'floor_work' and w.provider = 'sim'"
                    )
                ).all()
            # The on-demand worker is the pool's floor: handed inputs first, stopped last.
            fid = sim_app.floor_work._function_id
            od_live = {r[1] for r in rows if r[0] == "on-demand" and r[2] in ("starting", "ready")}
            wait_for(lambda: handle.cp._floors.get(fid) == od_live, what="the on-demand floor to be set")
    markets = [r[0] for r in rows]
    assert markets.count("on-demand") == 1, markets  # exactly the floor, not more
    assert markets.count("spot") >= 1, markets  # the rest on the cheaper spot market
