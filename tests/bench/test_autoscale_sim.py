"""Smoke tests of ``bench/autoscale_sim.py`` on tiny scenarios (seconds): invariants that a wrong model breaks.

Needs the shared price catalog snapshot beside the checkout (``../shared/pricing/catalogs/v8``), as the
benchmark does; skipped without it. No timing is asserted: simulated time only.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cloudmodal.gpu import parse_gpu
from cloudmodal.spec import AutoscalerSettings

BENCH = Path(__file__).resolve().parents[2] / "bench" / "autoscale_sim.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("autoscale_sim", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["autoscale_sim"] = mod  # dataclass-free, but keep it importable by name for pickling/rich
    spec.loader.exec_module(mod)
    return mod


sim_mod = _load()


@pytest.fixture(scope="module")
def catalog() -> Path:
    d = sim_mod.default_catalog_dir()
    if not d.is_dir():
        pytest.skip(f"needs the shared price catalog snapshot at {d}, which is absent here")
    return d


def _args(catalog: Path, *extra: str) -> Any:
    return sim_mod.parse_args(["--catalog-dir", str(catalog), *extra])


@pytest.fixture(scope="module")
def tiny(catalog: Path) -> dict[str, Any]:
    """12 pools, half an hour of load, the correlated outages, one input in 20 tracked."""
    args = _args(
        catalog, "--pools", "12", "--hours", "0.5", "--scenarios", "--track-every", "20", "--seed", "3"
    )
    return sim_mod.Sim(args).run()


def test_every_tracked_input_gives_exactly_one_result(tiny: dict[str, Any]) -> None:
    assert tiny["tracked"] > 100
    assert tiny["tracked_more_than_once"] == 0
    assert tiny["tracked_no_result"] == 0
    assert tiny["tracked_still_queued"] == 0
    assert tiny["tracked_once"] == tiny["tracked"]


def test_fluid_counts_balance_and_nothing_is_left(tiny: dict[str, Any]) -> None:
    assert tiny["inputs_in"] > 0
    assert tiny["inputs_left"] == 0
    assert tiny["inputs_out"] == tiny["inputs_in"]


def test_the_optimum_is_below_the_cost_and_above_its_lower_bound(tiny: dict[str, Any]) -> None:
    for d, o in tiny["optimum"].items():
        assert 0 < o["lower_bound"] <= o["optimum_no_floors"] <= tiny["cost"], d
        assert o["lower_bound"] <= o["optimum"] <= tiny["cost"], d
        assert o["cost_ratio"] >= 1.0, d
    assert tiny["optimum_unrun_worker_s"] == 0.0  # the optimum ran all the work it was given


def test_walks_try_at_most_max_launch_tries(tiny: dict[str, Any]) -> None:
    assert tiny["walks"] > 0
    assert tiny["launch_tries"] <= tiny["walks"] * sim_mod.MAX_LAUNCH_TRIES
    assert tiny["launch_tries"] == tiny["capacity_failures"] + tiny["quota_failures"] + (
        tiny["launched"] - _warm(tiny)
    )


def _warm(r: dict[str, Any]) -> int:
    """Workers the run started warm at 00:00 (no walk): launched minus the walks' successes."""
    return r["launched"] - (r["launch_tries"] - r["capacity_failures"] - r["quota_failures"])


def _one_pool(catalog: Path, tiers: list[str], spot: str) -> tuple[Any, Any]:
    """A Sim holding one batch pool of ``tiers`` (one worker at most, so its launches run one at a time)."""
    sim = sim_mod.Sim(_args(catalog, "--pools", "0", "--hours", "1", "--track-every", "1"))
    p = sim_mod.make_pools(1, random.Random(7))[0]
    p.kind, p.tiers, p.spot, p.min_od = "batch", parse_gpu(tiers), spot, 0
    p.target = p.max_inputs = 1
    p.peak_rate = p.burst_per_h = 0.0
    p.service_s = 60.0
    p.settings = AutoscalerSettings(min_containers=0, max_containers=1, buffer_containers=0)
    sim.pools = [p]
    sim._init_opt(p)
    return sim, p


@pytest.mark.parametrize("spot", ["allow", "never"])
def test_a_first_tier_out_everywhere_gives_way_to_the_next_within_the_tier_bound(
    catalog: Path, spot: str
) -> None:
    """H100 out on every cloud (over 200 offers): the pool's first worker is an A100-80GB, after at most
    ``tier_bound`` failed launches (the class blocks), not after a walk over every H100 offer."""
    sim, p = _one_pool(catalog, ["H100", "A100-80GB"], spot)
    out = sim_mod.Outage("H100 out", "gpu", 0.0, 10.0, "H100")
    sim.cloud.outages.append(out)
    sim.scenarios = sim_mod.Scenarios([out])
    sim.scenarios.live.append(out)
    out.affected.add(p.i)
    failed: list[str] = []  # the GPU type of each failed launch
    answer = sim.on_walk

    def on_walk(launch: Any, t: float) -> None:
        if not launch.ok:
            failed.append(launch.cand.key.gpu)
        answer(launch, t)

    sim.on_walk = on_walk
    sim.step(p, 0.0, burst=3)
    first = None
    while sim.heap and first is None:
        t, _, kind, obj, token = sim_mod.heapq.heappop(sim.heap)
        if kind == sim_mod.STEP and token == obj.token:
            sim.step(obj, t)
        elif kind == sim_mod.WALK:
            sim.on_walk(obj, t)
        elif kind == sim_mod.READY:
            sim.on_ready(obj, t)
        workers = [*p.starting.values(), *p.ready]
        if workers:
            first = workers[0]
    assert first is not None
    assert first.key.gpu == "A100-80GB"
    markets = 2 if spot == "allow" else 1
    assert 0 < failed.count("H100") <= sim.policy.tier_bound(markets)
    assert out.first[p.i] == pytest.approx(first.launched)  # time to the next tier, as reported


def test_a_spot_replacement_drains_the_on_demand_worker_only_once_it_is_ready(catalog: Path) -> None:
    sim, p = _one_pool(catalog, ["L4"], "allow")
    p.settings = AutoscalerSettings(min_containers=1, max_containers=2, buffer_containers=0)
    od = sim._rank(p, "never", 0.0)[0]
    old = sim._start_worker(p, od, 0.0, None, ready_at=0.0)
    sim.on_ready(old, 0.0)
    launch = sim.submit(p, 1000.0)
    launch.replaces = old.id
    p.replacing[launch.id] = old.id
    sim.launches[launch.id] = launch
    while launch.worker is None and not launch.done:
        t, _, kind, obj, _ = sim_mod.heapq.heappop(sim.heap)
        if kind == sim_mod.WALK:
            sim.on_walk(obj, t)
    new = launch.worker
    assert new is not None
    sim.settle(p, new.launched)  # the replacement boots: the on-demand worker keeps serving
    assert old.state == 1 and p.replacing
    sim.on_ready(new, new.ready_at)
    if new.market == sim_mod.SPOT:
        assert old.state == 3 and not p.replacing  # drained once the spot worker is ready
        assert sim.c["replaced"] == 1
    else:  # it came up on demand: the old worker stays, the replacement is forgotten
        assert old.state == 1 and not p.replacing


def test_the_arrival_optimum_does_not_depend_on_the_policy(catalog: Path) -> None:
    """The yardstick is built from the arrival stream: the same with 8 launch threads or 1."""
    base = ["--pools", "6", "--hours", "0.5", "--seed", "5"]
    a = sim_mod.Sim(_args(catalog, *base)).run()
    b = sim_mod.Sim(_args(catalog, *base, "--launch-threads", "1")).run()
    assert a["inputs_in"] == b["inputs_in"]
    oa, ob = a["optimum"]["arrivals"], b["optimum"]["arrivals"]
    # (the declared floors' idle tail runs to the end of each run, which the policy does move)
    for k in ("lower_bound", "startups", "kept_idle", "startups_no_floors", "kept_idle_no_floors"):
        assert math.isclose(oa[k], ob[k], rel_tol=1e-9), k
    assert oa["boots"] == ob["boots"]


def test_launches_that_find_nothing_to_try_hand_their_thread_on_without_recursion(catalog: Path) -> None:
    """Thousands of launches queued for one thread, each ending at once (every candidate blocked): they all
    end, the thread is free again, and each counts as an exhausted walk."""
    sim, p = _one_pool(catalog, ["H100"], "never")
    keys = [o.key("on-demand") for o in sim.cloud.offers_of("H100") if o.price("on-demand") is not None]
    sim.blocks.block_all(keys, 1e9, "test: out of stock")
    sim.threads_free = 0  # the thread is busy with another launch while these are submitted
    for _ in range(3000):
        sim.submit(p, 0.0)
    assert len(sim.walk_queue) == 3000
    holder = sim_mod.Launch("held", p, 0.0, False)
    p.launching += 1
    sim._end_walk(holder, 1.0)  # that launch ends: its thread takes the queue
    assert not sim.walk_queue
    assert sim.threads_free == 1
    assert sim.c["exhausted"] == 3000
    assert p.launching == 0
