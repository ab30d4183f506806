"""The launch walk on the sim cloud: a first tier out of stock everywhere gives way to the second, and a pool
moving back to spot keeps its on-demand worker until the spot replacement is ready.

Real control plane, real worker processes; the `sim` provider decides capacity, delays and preemptions."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fallback_app
import move_back_app
import pytest
from sqlalchemy import text
from support import OFFERS, sim_plane

from cloudmodal.client.session import run_app
from cloudmodal.pricing.catalog import CATALOG_DIR_ENV, load_offer_table
from cloudmodal.providers.sim import SimProvider
from cloudmodal.server.app import ServerHandle

# The shared catalog snapshot beside the checkout (as tests/conftest.py's SHARED finds it): over 200 H100 offers.
V8 = Path(__file__).resolve().parents[2].parent / "shared" / "pricing" / "catalogs" / "v8"


def wait_for(
    pred: Callable[[], object], timeout: float, what: str, explain: Callable[[], str] = str
) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{explain()}")


@contextmanager
def catalog_plane(tmp_path: Path, scenario: dict, **env: str) -> Iterator[tuple[ServerHandle, SimProvider]]:
    """A control plane whose sim cloud sells every offer of the shared catalog."""
    if not V8.is_dir():
        pytest.skip(f"needs the shared price catalog snapshot at {V8}, which is absent here")
    with sim_plane(
        tmp_path, scenario, offers=load_offer_table(V8), **{CATALOG_DIR_ENV: str(V8), **env}
    ) as got:
        yield got


def rows(handle: ServerHandle, sql: str, **params: object) -> list:
    with handle.cp.db.read() as conn:
        return list(conn.execute(text(sql), params))


def event_log(handle: ServerHandle, app_id: str) -> str:
    evs = handle.cp.activity.events(app_id, limit=10_000)
    return "\n".join(f"{e['kind']}: {e['message'][:200]}" for e in evs[-40:])


def test_map_completes_on_the_second_tier_when_the_first_is_out_of_stock_everywhere(tmp_path):
    scenario = {
        "capacity": [{"match": {"gpu": "H100"}, "mode": "none"}],
        "signals": False,  # the outage shows only in failed launches: this is about the walk through them
        "provisioning": {"delay_s": 0.2},
        "preemption": [{"match": {"market": "spot"}, "every_s": 4.0, "jitter_s": 0.5, "notice_s": 0.3}],
    }
    # Spot launch failures of H100 must not switch the pool to on-demand before it reaches A100-80GB, whose
    # cheapest offers are spot: that is where the preemptions hit.
    spot = json.dumps({"failure_threshold": 20})
    n = 400
    with catalog_plane(tmp_path, scenario, CLOUDMODAL_SPOT_SETTINGS=spot) as (handle, sim):
        with run_app(fallback_app.app, show_logs=False) as running:
            app_id = running.app_id

            def on_tier_2() -> list:
                return rows(
                    handle,
                    "select id from worker where gpu = 'A100-80GB' and state = 'ready' and market = 'spot'",
                )

            # A bounded number of tries reaches the second tier; before the fix each walk tried 12 of the
            # catalog's H100 offers and backed off, and the first A100-80GB worker came minutes later (the
            # bound tells minutes from a worker's start on a busy machine)
            first = wait_for(
                on_tier_2, 90, "a ready A100-80GB spot worker", lambda: event_log(handle, app_id)
            )
            results: list[int] = []
            mapper = threading.Thread(
                target=lambda: results.extend(fallback_app.square.map(range(n))), daemon=True
            )
            mapper.start()
            sim.preempt(first[0][0], notice_s=0.3)  # at least one preemption mid-map, whatever the timing
            mapper.join(timeout=180)
            assert not mapper.is_alive(), "the map did not finish in 180 s\n" + event_log(handle, app_id)
            evs = handle.cp.activity.events(app_id, limit=10_000)
            (attempts,) = rows(handle, "select coalesce(sum(attempts), 0) from input")[0]
            h100 = rows(handle, "select count(*) from worker where gpu = 'H100' and ready_at is not null")
    assert results == [x * x for x in range(n)]  # every input, exactly once, in order
    assert attempts == 0  # preemptions and stockouts never consume the user's Retries
    assert h100[0][0] == 0
    kinds = [e["kind"] for e in evs]
    assert "worker.preempted" in kinds
    # `app events` says why the walk moved on: the class blocked and the tier it moved to.
    moved = [e for e in evs if e["kind"] == "placement.next_tier"]
    assert moved, kinds
    assert "H100" in moved[0]["message"] and "moving on to tier 2, A100-80GB" in moved[0]["message"]
    assert any("H100" in b for b in moved[0]["data"]["blocked"]), moved[0]
    blocked = [e["message"] for e in evs if e["kind"] == "placement.class_blocked"]
    assert any(m.startswith("H100 ") for m in blocked), blocked
    # The walk is bounded: H100 launch failures before the first A100-80GB worker launched.
    first_launch = kinds.index("worker.launched")
    failed = [e for e in evs[:first_launch] if e["kind"] == "launch.failed"]
    assert 0 < len(failed) <= 12 + 2, [e["message"][:80] for e in failed]


def test_moving_back_to_spot_drains_the_on_demand_worker_once_its_replacement_is_ready(tmp_path):
    spot_settings = json.dumps(
        {"probe_interval_s": 1.0, "block_capacity_s": 1.0, "replace_interval_s": 0.5, "failure_threshold": 2}
    )
    # Spot workers take 2 s to provision: long enough that draining the on-demand worker at once shows.
    scenario = {"provisioning": {"rules": [{"match": {"market": "spot"}, "delay_s": 2.0}]}}
    with sim_plane(tmp_path, scenario, CLOUDMODAL_SPOT_SETTINGS=spot_settings) as (handle, sim):
        assert {o.gpu for o in OFFERS} >= {"A10"}
        sim.set_capacity({"market": "spot"}, False)  # no spot at first: the pool falls back to on-demand
        with run_app(move_back_app.app, show_logs=False) as running:
            app_id = running.app_id
            fid = move_back_app.steady._function_id
            q = "select id from worker where function_id = :f and market = 'on-demand' and state = 'ready'"
            od = wait_for(
                lambda: rows(handle, q, f=fid), 30, "an on-demand worker", lambda: event_log(handle, app_id)
            )[0][0]
            sim.set_capacity({"market": "spot"}, True)  # spot is back: a probe, then the move back

            def od_stopped() -> list:
                return rows(
                    handle,
                    "select stopped_at, stop_reason from worker where id = :w and state = 'stopped'",
                    w=od,
                )

            ((stopped_at, stop_reason),) = wait_for(
                od_stopped, 40, "the on-demand worker to be replaced", lambda: event_log(handle, app_id)
            )
            rebalance = [
                e for e in handle.cp.activity.events(app_id, limit=10_000) if e["kind"] == "pool.rebalance"
            ]
            assert rebalance and stop_reason == "replaced by a cheaper spot worker", stop_reason
            # The replacement: the spot worker launched when the move back was decided (a probe came earlier).
            ts = rebalance[0]["ts"]
            spot = rows(
                handle,
                "select id, started_at, ready_at from worker where function_id = :f and market = 'spot' "
                "and started_at >= :t order by started_at",
                f=fid,
                t=ts - 0.5,
            )
    assert spot, "no spot replacement was launched"
    _, _, ready_at = spot[0]
    # The pool is never short: the on-demand worker served until its replacement was ready.
    assert ready_at is not None and stopped_at >= ready_at, (
        f"the on-demand worker stopped at {stopped_at}, before its spot replacement was ready ({ready_at})"
    )
