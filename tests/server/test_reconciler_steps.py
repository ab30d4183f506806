"""A reconciler tick's decisions, one step at a time, in-process.

A real :class:`ControlPlane` on a temporary SQLite database and a real :class:`Reconciler`, driven by single
``tick(now)`` calls with a manual clock; launches run inline (an executor that runs each at once), and the only
test double is the cloud at the provider edge (:class:`FakeCloud`, the ``providers.base`` protocol), whose
stock the tests turn on and off. Timestamps the control plane writes itself (a worker's ``idle_since``,
``last_heartbeat``) are real time; the tests move the clock relative to those rows, never to the wall clock.

Plus unit tests of the pure rules in :mod:`cloudmodal.server.scaling_rules`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloudmodal.gpu import parse_gpu
from cloudmodal.pricing.offers import Offer, OfferKey
from cloudmodal.providers.base import (
    LaunchRequest,
    NoCapacityError,
    Provider,
    WorkerHandle,
    WorkerStatus,
)
from cloudmodal.server import models
from cloudmodal.server.queue import OutputItem
from cloudmodal.server.reconciler import Reconciler, ReconcilerSettings
from cloudmodal.server.scaling_rules import (
    LAUNCH_BACKOFF_S,
    PoolWorker,
    SpotMove,
    dispatch_key,
    dispatch_price,
    launch_backoff,
    launch_mode,
    launch_spacing,
    launch_walk,
    move_back_to_spot,
    on_demand_floor,
    on_demand_launches,
    record_launch_failure,
    record_launch_success,
    settle_replacements,
)
from cloudmodal.server.service import ControlPlane, Settings
from cloudmodal.server.spot import BlockList, MarketPolicy, MarketSettings, PoolMarketState, StockoutLog
from cloudmodal.server.states import WorkerState
from cloudmodal.spec import AutoscalerSettings, FunctionSpec

D = "2026-01-01"
W = models.workers
H100 = [
    Offer("fake", f"r{i}", f"r{i}-a", "h100.x1", "H100", 1, 80, 16, 128, 2.0 + i / 10, 1.0 + i / 10, "t", D)
    for i in range(3)
]
A100 = [Offer("fake", "r0", "r0-a", "a100.x1", "A100-80GB", 1, 80, 16, 128, 9.0, 5.0, "t", D)]


class FakeCloud(Provider):
    """A cloud at the provider edge: launches succeed unless ``out(offer key)`` says the offer is out of stock;
    a launched worker stays alive until terminated."""

    name = "fake"

    def __init__(self, offers: list[Offer]) -> None:
        self._offers = offers
        self.out: Callable[[OfferKey], bool] = lambda key: False
        self.tries: list[LaunchRequest] = []
        self.alive: dict[str, bool] = {}
        self.terminated: list[str] = []

    def offers(self) -> list[Any]:
        return list(self._offers)

    def launch(self, req: LaunchRequest) -> WorkerHandle:
        self.tries.append(req)
        assert req.offer is not None
        if self.out(req.offer.key(req.market)):
            raise NoCapacityError("out of stock", offer=req.offer, reason="InsufficientInstanceCapacity")
        self.alive[req.worker_id] = True
        price = req.offer.price(req.market)
        return WorkerHandle(req.worker_id, self.name, f"i-{req.worker_id}", req.offer, req.market, price, 0.0)

    def terminate(self, handle: WorkerHandle, *, grace_s: float = 10.0) -> None:
        self.terminated.append(handle.worker_id)
        self.alive[handle.worker_id] = False

    def describe(self, handle: WorkerHandle) -> WorkerStatus:
        return WorkerStatus("running" if self.alive.get(handle.worker_id) else "exited", returncode=0)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Inline(Executor):
    """Runs each launch at once, on the ticking thread: a tick's launches are done when it returns."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        f.set_result(fn(*args, **kwargs))
        return f


class Pool:
    """One function on a control plane, and the reconciler ticking it."""

    def __init__(self, tmp_path: Path, cloud: FakeCloud, spec: FunctionSpec, market: MarketSettings) -> None:
        self.cp = ControlPlane(
            Settings(
                database_url=f"sqlite:///{tmp_path / 'cp.db'}",
                state_dir=tmp_path,
                lease_s=3600.0,
                worker_timeout_s=30.0,
                retention_interval_s=1e12,
            )
        )
        self.cloud = cloud
        self.clock = Clock(time.time())
        self.sleeps: list[float] = []
        self.rec = Reconciler(
            self.cp,
            {"fake": cloud},
            "http://127.0.0.1:1",
            clock=self.clock,
            settings=ReconcilerSettings(market=market, max_workers=16),
            executor=Inline(),
            sleep=self.sleeps.append,
        )
        self.cp.apps.create_app("ap-steps", "steps", False)
        self.fid = self.cp.functions.create_function(
            {"app_id": "ap-steps", "name": spec.name, "spec": spec.to_wire()}
        )["function_id"]
        self.calls = 0

    def call(self, n: int = 1) -> None:
        self.calls += 1
        self.cp.calls.create_call(
            f"fc-{self.calls}", self.fid, "map", [(i, None, b"x", None) for i in range(n)]
        )

    def tick(self, advance: float = 0.0) -> None:
        self.clock.t += advance
        self.rec.tick(self.clock())

    def workers(self) -> list[Any]:
        with self.cp.db.read() as conn:
            return list(conn.execute(select(W).where(W.c.function_id == self.fid).order_by(W.c.started_at)))

    def worker(self, wid: str) -> Any:
        return next(w for w in self.workers() if w.id == wid)

    def live(self) -> list[Any]:
        return [w for w in self.workers() if w.state != WorkerState.STOPPED]

    def ready(self, wid: str) -> Any:
        """The worker's process came up (what its register and ready calls do)."""
        self.cp.workers.register_worker(wid, 1, "fake-host")
        self.cp.workers.worker_ready(wid)
        return self.worker(wid)

    def claim(self, wid: str) -> None:
        assert self.cp.queue.claim(self.fid, wid, 1, 3600.0)

    def finish(self, wid: str) -> None:
        (got,) = self.cp.queue.claim(self.fid, wid, 1, 3600.0)
        self.cp.queue.complete_rows(wid, [OutputItem(got.input_id, "success", b"y")])

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.cp.activity.events("ap-steps") if e["kind"] == kind]

    def close(self) -> None:
        self.rec.stop(terminate_workers=False)
        self.cp.db.dispose()


def gpu_spec(**kw: Any) -> FunctionSpec:
    return FunctionSpec(name="f", module="m", qualname="f", gpu=parse_gpu(kw.pop("gpu", ["H100"])), **kw)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def make_pool(spec: FunctionSpec, offers: list[Offer] = H100, **market: Any) -> Pool:
        p = Pool(tmp_path, FakeCloud(offers), spec, MarketSettings(**market))
        pools.append(p)
        return p

    yield make_pool
    for p in pools:
        p.close()


# -- a tick's decisions --------------------------------------------------------------------------------------
def test_a_backlog_launches_workers_on_the_cheapest_candidate(make: Callable[..., Pool]) -> None:
    p = make(gpu_spec())
    p.tick()
    assert p.workers() == []  # no work, no workers
    p.call(2)
    p.tick()
    ws = p.workers()
    assert len(ws) == 2 and all(w.state == WorkerState.STARTING for w in ws)
    assert {(w.provider, w.market, w.gpu, w.price_per_hour) for w in ws} == {("fake", "spot", "H100", 1.0)}
    assert p.events("pool.scale_up")
    p.tick()
    assert len(p.workers()) == 2  # the starting workers count: nothing launched twice


def test_an_idle_worker_is_drained_once_the_scaledown_window_has_passed(make: Callable[..., Pool]) -> None:
    p = make(gpu_spec(autoscaler=AutoscalerSettings(scaledown_window=10)))
    p.call(1)
    p.tick()
    (w,) = p.workers()
    p.ready(w.id)
    p.finish(w.id)
    idle_since = p.worker(w.id).idle_since
    p.clock.t = idle_since + 9.0
    p.tick()
    assert p.worker(w.id).state == WorkerState.READY  # idle, but not for the window yet
    p.clock.t = idle_since + 11.0
    p.tick()
    assert p.worker(w.id).state == WorkerState.DRAINING
    assert p.events("pool.scale_down")


def test_a_stockout_fails_over_to_the_next_candidate_and_blocks_the_offer(make: Callable[..., Pool]) -> None:
    p = make(gpu_spec())
    cheapest = H100[0].key("spot")
    p.cloud.out = lambda key: key == cheapest
    p.call(1)
    p.tick()
    assert [r.offer.region for r in p.cloud.tries] == ["r0", "r1"]
    (w,) = p.workers()
    assert (w.market, w.price_per_hour, w.offer["region"]) == ("spot", 1.1, "r1")
    assert cheapest in p.rec.blocks.active(p.clock())
    assert len(p.events("launch.failed")) == 1
    # The next launch skips the blocked offer without trying it.
    p.call(1)
    p.tick()
    assert [r.offer.region for r in p.cloud.tries[2:]] == ["r1"]


def test_a_tier_out_of_stock_gives_way_to_the_next_tier_once_its_class_is_blocked(
    make: Callable[..., Pool],
) -> None:
    p = make(
        gpu_spec(gpu=["H100", "A100-80GB"]),
        offers=H100 + A100,
        class_stockouts=2,
        type_stockouts=2,
        failure_threshold=100,
    )
    p.cloud.out = lambda key: key.gpu == "H100"
    p.call(1)
    p.tick()
    (w,) = p.live()
    assert w.gpu == "A100-80GB" and w.market == "spot"
    h100_tries = [r for r in p.cloud.tries if r.offer.gpu == "H100"]
    # Two failures per market block the class: H100 spot, then H100 on demand; the third offers are skipped.
    assert len(h100_tries) == p.rec.market_policy.tier_bound(2) == 4
    assert {r.offer.region for r in h100_tries} == {"r0", "r1"}
    assert len(p.events("placement.class_blocked")) >= 2
    (moved,) = p.events("placement.next_tier")
    assert "tier 2" in moved["message"]
    # tries on the one cloud: the first few without a gap, then spaced (without sleeping for real)
    assert p.sleeps == [0.1]


def test_the_on_demand_floor_forces_on_demand_launches_and_is_handed_to_dispatch(
    make: Callable[..., Pool],
) -> None:
    p = make(gpu_spec(min_on_demand=1))
    p.call(3)
    p.tick()
    ws = p.workers()
    assert sorted(w.market for w in ws) == ["on-demand", "spot", "spot"]
    od = next(w for w in ws if w.market == "on-demand")
    assert od.price_per_hour == 2.0  # the cheapest on-demand offer
    p.tick()
    assert p.rec._floors[p.fid] == frozenset([od.id])
    assert p.cp._floors[p.fid] == frozenset([od.id])  # the control plane hands it inputs first
    # The floor worker gone: the next launch is on demand again.
    p.cp.workers.worker_stopped(od.id, "test: gone", crashed=False)
    p.call(1)
    p.tick()
    # (its input went back to the queue: two launches, the floor's first)
    new = [w for w in p.live() if w.id not in {x.id for x in ws}]
    assert sorted(w.market for w in new) == ["on-demand", "spot"]


def test_moving_back_to_spot_drains_the_on_demand_worker_only_once_its_replacement_is_ready(
    make: Callable[..., Pool],
) -> None:
    p = make(gpu_spec(), failure_threshold=100, block_capacity_s=5.0, replace_interval_s=0.0)
    p.cloud.out = lambda key: key.market == "spot"
    p.call(1)
    p.tick()
    (od,) = p.live()
    assert od.market == "on-demand"  # every spot offer failed: the walk moved on to on-demand
    p.ready(od.id)
    p.claim(od.id)  # busy: the pool needs its one worker
    p.cloud.out = lambda key: False  # spot is back
    p.tick(10.0)  # past the blocks
    spot = [w for w in p.live() if w.id != od.id]
    assert [w.market for w in spot] == ["spot"] and spot[0].state == WorkerState.STARTING
    (move,) = p.events("pool.rebalance")
    assert od.id in move["message"] and spot[0].id in move["message"]
    assert p.worker(od.id).state == WorkerState.READY  # keeps serving while the replacement boots
    p.tick(1.0)
    assert p.worker(od.id).state == WorkerState.READY
    assert len(p.live()) == 2  # not replaced twice
    p.ready(spot[0].id)
    p.tick(1.0)
    assert p.worker(od.id).state == WorkerState.DRAINING
    assert p.events("pool.rebalanced")


def test_a_spot_probe_that_finds_no_spot_adds_no_on_demand_worker(make: Callable[..., Pool]) -> None:
    """A fallen-back pool's probe is one extra worker wanted on spot only: while spot stays out, each probe
    tries spot offers and ends there, instead of walking on to on-demand and growing the pool."""
    p = make(gpu_spec(), failure_threshold=1, block_capacity_s=1.0, probe_interval_s=5.0)
    p.cloud.out = lambda key: key.market == "spot"
    p.call(1)
    p.tick()
    (od,) = p.live()
    assert od.market == "on-demand" and p.events("pool.spot_fallback")
    p.ready(od.id)
    p.claim(od.id)  # busy: the autoscaler wants exactly this one worker
    for _ in range(3):
        tried = len(p.cloud.tries)
        p.tick(6.0)  # past the probe interval and the blocks
        probe_tries = p.cloud.tries[tried:]
        assert probe_tries and {t.market for t in probe_tries} == {"spot"}
        assert [w.id for w in p.live()] == [od.id]
    assert len(p.events("pool.spot_probe")) == 3
    assert len(p.events("launch.spot_unavailable")) == 3
    assert not p.events("launch.exhausted")  # a failed probe does not back off the pool's own launches


def test_a_silent_worker_is_reaped_after_the_timeout_and_its_input_requeued(
    make: Callable[..., Pool],
) -> None:
    p = make(gpu_spec())
    p.call(1)
    p.tick()
    (w,) = p.workers()
    p.ready(w.id)
    p.claim(w.id)
    last = p.worker(w.id).last_heartbeat
    p.clock.t = last + p.cp.settings.worker_timeout_s - 1.0
    p.tick()
    assert p.worker(w.id).state == WorkerState.READY and p.cloud.terminated == []
    p.clock.t = last + p.cp.settings.worker_timeout_s + 1.0
    p.tick()
    assert p.worker(w.id).state == WorkerState.STOPPED
    assert p.cloud.terminated == [w.id]
    # Its input went back to the queue, and the same tick started a replacement for it.
    (new,) = p.live()
    assert new.id != w.id and new.state == WorkerState.STARTING


def test_settings_come_from_one_place() -> None:
    s = ReconcilerSettings.from_env(
        {"CLOUDMODAL_SPOT_SETTINGS": '{"probe_interval_s": 30}', "CLOUDMODAL_LOCAL_MAX_WORKERS": "3"}
    )
    assert s.market.probe_interval_s == 30 and s.max_workers == 3
    assert ReconcilerSettings.from_env({}).market == MarketSettings()
    from cloudmodal.exception import InvalidError

    with pytest.raises(InvalidError, match="CLOUDMODAL_SPOT_SETTINGS"):
        ReconcilerSettings.from_env({"CLOUDMODAL_SPOT_SETTINGS": '{"nope": 1}'})


# -- the pure rules ------------------------------------------------------------------------------------------
def pw(wid: str, market: str = "on-demand", price: float = 2.0, at: float = 0.0, **kw: Any) -> PoolWorker:
    return PoolWorker(wid, kw.pop("state", WorkerState.READY), market, price, at, **kw)


def test_on_demand_floor_is_the_cheapest_then_oldest_live_on_demand_cloud_workers() -> None:
    ws = [
        pw("a", price=3.0),
        pw("b", price=2.0, at=5.0),
        pw("c", price=2.0, at=1.0),
        pw("d", price=1.0, state=WorkerState.DRAINING),
        pw("e", price=0.0, cloud=False),
        pw("f", "spot", 0.5),
    ]
    assert on_demand_floor(2, ws) == {"c", "b"}
    assert on_demand_floor(0, ws) == frozenset()
    policy = MarketPolicy()
    assert on_demand_launches(policy, 2, ws) == 0  # a, b, c live on demand
    assert on_demand_launches(policy, 5, ws, launching_on_demand=1) == 1
    assert on_demand_launches(policy, 1, []) == 1


def test_dispatch_counts_a_floor_worker_as_free() -> None:
    assert dispatch_price(2.0, True) == 0.0 and dispatch_price(2.0, False) == 2.0
    order = sorted(
        [("spot", 1.0, False, 1.0), ("od", 2.0, True, 2.0), ("old", 1.0, False, 0.0)],
        key=lambda x: dispatch_key(x[1], x[2], x[3]),
    )
    assert [x[0] for x in order] == ["od", "old", "spot"]


def test_launch_backoff_and_spacing() -> None:
    assert [launch_backoff(n) for n in range(1, 8)] == [*LAUNCH_BACKOFF_S, LAUNCH_BACKOFF_S[-1]]
    assert [launch_spacing(n) for n in range(8)] == [0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.4, 0.8]
    assert launch_spacing(20) == 1.0


def test_launch_mode_forces_on_demand_for_the_floor_and_follows_the_fallback() -> None:
    policy, state = MarketPolicy(MarketSettings(failure_threshold=1, probe_interval_s=60)), PoolMarketState()
    assert launch_mode("allow", policy, state, 0.0) == "allow"
    assert launch_mode("allow", policy, state, 0.0, on_demand=True) == "never"
    policy.record_spot_failure(state, 1.0)
    assert launch_mode("allow", policy, state, 2.0) == "never"
    assert launch_mode("allow", policy, state, 62.0) == "allow"  # the probe, used
    assert launch_mode("allow", policy, state, 63.0) == "never"


def test_record_launch_failure_blocks_counts_classes_and_falls_back() -> None:
    policy = MarketPolicy(MarketSettings(failure_threshold=2, class_stockouts=2))
    blocks, log, state = BlockList(), StockoutLog(), PoolMarketState()
    k0, k1 = H100[0].key("spot"), H100[1].key("spot")
    got = record_launch_failure(
        policy,
        blocks,
        state,
        k0,
        "spot",
        10.0,
        "NoCapacityError",
        capacity=True,
        stockouts=log,
        class_offers=H100,
    )
    assert (
        got.until == 10.0 + policy.settings.block_capacity_s
        and got.classes == []
        and got.spot_fallback is None
    )
    got = record_launch_failure(
        policy,
        blocks,
        state,
        k1,
        "spot",
        11.0,
        "NoCapacityError",
        capacity=True,
        stockouts=log,
        class_offers=H100,
    )
    assert [c.describe() for c, _, _ in got.classes] == ["H100 spot on fake"]
    assert H100[2].key("spot") in blocks.active(11.0)  # the class's offers, tried or not
    assert got.spot_fallback is not None and state.fallen_back
    # On demand: blocks, but no spot failure; a success clears the class's count and may restore spot.
    od = H100[0].key("on-demand")
    got = record_launch_failure(
        policy, blocks, state, od, "on-demand", 12.0, "x", capacity=True, stockouts=log
    )
    assert od in blocks.active(12.0) and got.spot_fallback is None
    assert record_launch_success(policy, state, od, "on-demand", 13.0, stockouts=log) is None
    assert ("fake", "H100", "on-demand") not in log.failures
    assert record_launch_success(policy, state, k0, "spot", 14.0, stockouts=log) is not None
    assert not state.fallen_back
    # Without an offer (a provider with no catalog): only the spot failure counts.
    assert record_launch_failure(policy, blocks, state, None, "on-demand", 15.0, "x").until is None


def test_launch_walk_reranks_and_skips_blocked() -> None:
    blocked: set[int] = set()
    lists = iter([[1, 2, 3], [4, 2, 5]])
    got = []
    for c in launch_walk(lambda: next(lists, []), lambda c: c, lambda c: c in blocked, max_tries=10):
        got.append(c)
        blocked.add(3)  # a class blocked by the first failure: skipped without a try
    assert got == [1, 2, 4, 5]


def test_move_back_to_spot_probes_while_fallen_back_then_replaces_the_dearest_above_the_floor() -> None:
    policy = MarketPolicy(MarketSettings(failure_threshold=1, probe_interval_s=60, replace_interval_s=0))
    state = PoolMarketState()
    ws = [pw("cheap", price=2.0), pw("dear", price=3.0), pw("s", "spot", 1.0)]
    asked: list[bool] = []

    def price() -> float | None:
        asked.append(True)
        return 1.0

    assert move_back_to_spot(policy, state, [pw("s", "spot", 1.0)], 0, price, 0.0) == SpotMove()
    policy.record_spot_failure(state, 0.0)
    assert move_back_to_spot(policy, state, ws, 0, price, 30.0) == SpotMove(probe=False)
    assert move_back_to_spot(policy, state, ws, 0, price, 61.0) == SpotMove(probe=True)
    assert asked == []  # never priced while fallen back
    policy.record_spot_success(state, 61.0)
    assert move_back_to_spot(policy, state, ws, 0, price, 62.0) == SpotMove()  # spot just came back
    assert move_back_to_spot(policy, state, ws, 1, price, 200.0) == SpotMove(replace=("dear",))
    # "dear" is on its way out: "cheap" is the floor, nothing else to replace.
    assert move_back_to_spot(policy, state, ws, 1, price, 300.0, leaving={"dear"}) == SpotMove()
    assert move_back_to_spot(policy, state, ws, 0, lambda: None, 400.0) == SpotMove()


def test_settle_replacements_drains_only_once_the_spot_replacement_is_ready() -> None:
    old = pw("old", price=2.0)
    cases = {
        "starting": pw("new", "spot", 1.0, state=WorkerState.STARTING),
        "ready": pw("new", "spot", 1.0),
        "ready-od": pw("new", "on-demand", 2.0),
    }
    got = {
        name: settle_replacements({"new": "old"}, {"old": old, "new": new}, lambda wid: None)
        for name, new in cases.items()
    }
    assert got == {"starting": ([], []), "ready": ([("new", "old")], ["new"]), "ready-od": ([], ["new"])}
    # A replacement gone from the live workers: forgotten unless it is still starting (an older version).
    assert settle_replacements({"new": "old"}, {"old": old}, lambda wid: "stopped") == ([], ["new"])
    assert settle_replacements({"new": "old"}, {"old": old}, lambda wid: "starting") == ([], [])
