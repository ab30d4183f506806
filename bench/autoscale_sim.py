"""Autoscaling at fleet scale, by simulation: the real autoscaler, placement, launch walk and spot policy on
simulated time.

Drives cloudmodal's own decision code — ``Autoscaler.decide`` (``cloudmodal/server/autoscaler.py``), ``rank``
(``cloudmodal/placement.py``) over the shared price catalog, the reconciler's rules as pure functions
(``cloudmodal/server/scaling_rules.py``: the launch walk, its spacing and back-off, the on-demand floor, the
dispatch order, the move back to spot and the settling of replacements, constants included) and
``MarketPolicy`` / ``BlockList`` / ``StockoutLog`` (``cloudmodal/server/spot.py``) — through a day of bursty
load on many pools. No worker processes, no HTTP, no database: the cloud, the workers and the inputs are
simulated, and time is an event queue.

What is simulated (see bench/README.md for the numbers and the definitions):

- **Pools** with a GPU fallback list drawn from realistic types in the catalog, a spot setting, autoscaler
  settings, a per-worker concurrency and a service time per input. Online pools get a diurnal Poisson stream
  with spikes; batch pools get ``.map()`` bursts of thousands of inputs.
- **Inputs** are counts in a FIFO queue of arrival cohorts per pool. Each pool steps every ``--tick`` seconds
  (and at once on a burst or a preemption notice); a step serves, as a fluid, what the slot-seconds of its
  ready workers allow (``max_inputs`` slots a worker), and records each served input's wait in a histogram.
  One input in ``--track-every`` is also **tracked by id** (:class:`Tracker`): queue → a busy worker →
  result, or requeue on a preemption and run again; the report counts the ids that gave exactly one result.
- **Launches** are the reconciler's: each worker the autoscaler asks for is one launch with its own walk
  (``launch_walk``: at most ``MAX_LAUNCH_TRIES`` candidates, ``RANK_LIMIT`` per ranking, the market chosen by
  ``launch_mode`` at each ranking, blocked candidates skipped without a try, a new ranking when a list runs
  out), run on one of ``LAUNCH_THREADS`` launch threads shared by every pool (a launch waits for a free one).
  Each try takes simulated time: ``launch_spacing`` after a failure on the same cloud, then the cloud's call
  (``LAUNCH_CALL_S``). Failures go through ``record_launch_failure`` (offer, quota scope and class blocks,
  shared by every walk), successes through ``record_launch_success``; an exhausted walk backs the pool off
  (``launch_backoff``). The first launches of a pool below its ``min_on_demand`` are forced on demand
  (``on_demand_launches``); a ``spot="allow"`` pool launching nothing else probes spot or replaces on-demand
  workers (``move_back_to_spot``), and each replaced worker drains once its spot replacement is ready
  (``settle_replacements``).
- **Workers** boot (a provisioning delay per cloud plus the pool's start-up), run, are stopped by the
  autoscaler, or are preempted: a spot worker gets a notice, drains (its in-flight inputs go back to the
  queue at once, their partial work lost) and is billed until the notice ends. Preemptions come from a
  background rate per cloud and GPU and from reclaim waves when the offer's spot capacity runs out.
- **The cloud**: every (offer, market) goes in and out of stock (alternating exponential periods, shorter and
  rarer for scarce GPUs and for spot); a launch on an offer out of stock is a capacity failure, on a
  (cloud, GPU, market) without quota a quota failure. ``--scenarios`` adds **correlated** outages
  (:class:`Scenarios`): a GPU type out on every cloud for 1 h and for 6 h, the busiest region down for 2 h
  (its workers lost), a spot reclaim wave in the busiest spot region (most spot workers there noticed at
  once, its spot capacity gone for 1 h); for each, the time to each hit pool's first worker on the next tier.
- **What the autoscaler is told**: the estimates the reconciler passes it — the pool's service time (an
  EWMA over the steps that served inputs; None before the first result) and its start-up (the median launch →
  ready of its recent workers, the launch counted from its submission; None before the first boot).
  ``--no-estimates`` passes neither.
- **Cost** = $/h fixed at launch × time alive (booting included), against the **feasible offline optimum**,
  in two definitions shown side by side (see bench/README.md for the full definitions):

  - **on the arrival stream** (the yardstick): every input run on arrival (a map as fast as its
    ``max_containers`` allows), a worker serving ``max_inputs`` at once, on a fixed grid of 30 s bins that
    does not depend on the policy; each second of busy worker-time priced at p*(t), the $/h of the pool's
    cheapest feasible offer then (placement's order over the offers in stock with quota, outages included);
    plus the idle workers the pool's declared floors (``min_containers``, ``buffer_containers``) require,
    plus the start-ups a scheduler that knows the future must still pay (the profile cut into layers, each
    paying a boot when it appears, or the cheaper of a boot and staying idle through a gap);
  - **on the run's served profile**, a worker counted at ``target_inputs``: the same construction over the
    work this run started, on the capacity it had (so it moves with the run).

Run: ``.venv/bin/python bench/autoscale_sim.py`` (1,000 pools, 24 h); ``--quick`` (100 pools, 2 h) for seconds.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import random
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cloudmodal.gpu import GpuTier, parse_gpu  # noqa: E402
from cloudmodal.placement import Candidate, PlacementPolicy, rank  # noqa: E402
from cloudmodal.pricing.catalog import load_offer_table  # noqa: E402
from cloudmodal.pricing.offers import Offer, OfferKey, OfferTable  # noqa: E402
from cloudmodal.server.autoscaler import Autoscaler, PoolSnapshot, WorkerView  # noqa: E402
from cloudmodal.server.estimates import STARTUP_SAMPLES  # noqa: E402
from cloudmodal.server.reconciler_base import LAUNCH_THREADS  # noqa: E402
from cloudmodal.server.scaling_rules import (  # noqa: E402
    MAX_LAUNCH_TRIES,
    RANK_LIMIT,
    PoolWorker,
    dispatch_key,
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
from cloudmodal.server.spot import (  # noqa: E402
    BlockList,
    MarketPolicy,
    MarketSettings,
    PoolMarketState,
    SpotMode,
    StockoutLog,
)
from cloudmodal.spec import AutoscalerSettings  # noqa: E402

DAY = 86_400.0
TRACK_EVERY = 1000  # every this many inputs of a pool, one is tracked individually
SERVICE_EWMA = 0.2  # weight of a step's mean service time in the service-time estimate
SPOT, OD = "spot", "on-demand"
OD_MODE = "never"  # PlacementPolicy(spot=...) for on-demand only
# The start-up estimate's sample count, as the reconciler's (imported; the launch walk's constants and rules come
# from cloudmodal.server.scaling_rules: MAX_LAUNCH_TRIES, RANK_LIMIT, launch_spacing, launch_backoff).
BOOT_SAMPLES = STARTUP_SAMPLES
# The reconciler's launch executor (imported): at most this many walks run at once over all pools; the others
# wait their turn.
# How long a cloud's launch call takes to answer (s): the walk's thread is busy meanwhile. A model figure
# (RunInstances-style calls answer in seconds; failures a little faster than successes).
LAUNCH_CALL_S = {"aws": 1.5, "gcp": 3.0, "azure": 5.0, "lambda": 3.0, "runpod": 2.0}
LAUNCH_FAIL_FACTOR = 0.6

# --- the simulated cloud -----------------------------------------------------------------------------------

# Provisioning delay (s): median per cloud; lognormal spread. Then the pool's own start-up (image, @enter).
BOOT_MEDIAN_S = {"aws": 100.0, "gcp": 80.0, "azure": 150.0, "lambda": 240.0, "runpod": 45.0}
# Spot preemption, background rate per hour, by cloud; times a GPU factor. Notice period (s) by cloud.
PREEMPT_PER_H = {"aws": 0.02, "gcp": 0.04, "azure": 0.03, "runpod": 0.05, "lambda": 0.03}
NOTICE_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0, "runpod": 5.0, "lambda": 30.0}
SCARCE = frozenset({"H100", "H100-NVL", "H200", "A100-80GB", "A100-40GB", "B200"})
MID = frozenset({"L40S", "A10", "V100", "RTX-A6000"})
# Stock: mean hours in stock / minutes out of stock, by (market, scarcity).
STOCK = {
    (OD, "common"): (72.0, 10.0),
    (OD, "mid"): (48.0, 15.0),
    (OD, "scarce"): (12.0, 30.0),
    (SPOT, "common"): (12.0, 20.0),
    (SPOT, "mid"): (6.0, 30.0),
    (SPOT, "scarce"): (3.0, 60.0),
}
ARRIVAL_BIN_S = 30.0  # online arrivals are drawn per bin of this many seconds
BURST_SIGMA = 0.8  # spread of map sizes (lognormal) ...
BURST_MAX = 5.0  # ... cut at this many times the median (bigger jobs get split)
DRAIN_LIMIT_S = 48 * 3600.0  # after the load ends, run until every input is done, or this long
WAVE_P = 0.3  # when an offer's spot capacity runs out, each worker on it is reclaimed with this probability
ZERO_QUOTA_P = 0.05  # share of (cloud, GPU, market) combinations where the account has no quota


def scarcity(gpu: str, count: int) -> str:
    if gpu in SCARCE or count >= 4:
        return "scarce"
    return "mid" if gpu in MID else "common"


class Stock:
    """One (offer, market): alternating in-stock / out-of-stock periods, drawn lazily from its own RNG."""

    __slots__ = ("flips", "rng", "up_s", "down_s", "up0")

    def __init__(self, seed: int, up_h: float, down_min: float) -> None:
        self.rng = random.Random(seed)
        self.up_s, self.down_s = up_h * 3600.0, down_min * 60.0
        self.up0 = self.rng.random() < self.up_s / (self.up_s + self.down_s)
        first = self.rng.expovariate(1.0 / (self.up_s if self.up0 else self.down_s))
        self.flips = [first]  # times at which the state flips; state before flips[0] is up0

    def _extend(self, t: float) -> None:
        flips, rng = self.flips, self.rng
        while flips[-1] <= t:
            up_now = self.up0 == (len(flips) % 2 == 0)  # state after the last flip
            flips.append(flips[-1] + rng.expovariate(1.0 / (self.up_s if up_now else self.down_s)))

    def up(self, t: float) -> bool:
        self._extend(t)
        i = bisect.bisect_right(self.flips, t)
        return self.up0 == (i % 2 == 0)

    def next_flip(self, t: float) -> float:
        self._extend(t)
        return self.flips[bisect.bisect_right(self.flips, t)]

    def downs(self, t0: float, t1: float) -> list[float]:
        """Times in (t0, t1) at which stock runs out."""
        self._extend(t1)
        out = []
        i = bisect.bisect_right(self.flips, t0)
        flips = self.flips
        while i < len(flips) and flips[i] < t1:
            if self.up0 == (i % 2 == 0):  # up before this flip: it is a run-out
                out.append(flips[i])
            i += 1
        return out


class Cloud:
    """Stock and quota of every (offer, market) the pools can use, and the launch outcome."""

    def __init__(self, table: OfferTable, seed: int) -> None:
        self.table = table
        self.seed = seed
        self.stock: dict[OfferKey, Stock] = {}
        rng = random.Random(seed ^ 0x5EED)
        combos = sorted({(o.cloud, o.gpu, m) for o in table.offers for m in o.markets})
        self.no_quota = frozenset(c for c in combos if rng.random() < ZERO_QUOTA_P)
        self.gpu_offers: dict[str, tuple[Offer, ...]] = {}
        self.outages: list[Outage] = []  # correlated capacity losses (see Scenarios)

    def stock_of(self, key: OfferKey) -> Stock:
        s = self.stock.get(key)
        if s is None:
            up_h, down_min = STOCK[(key.market, scarcity(key.gpu, key.gpu_count))]
            s = self.stock[key] = Stock(zlib.crc32(str(key).encode()) ^ self.seed, up_h, down_min)
        return s

    def available(self, key: OfferKey, t: float) -> bool:
        """Whether a launch of ``key`` at ``t`` finds capacity: in stock and not in a correlated outage."""
        for o in self.outages:
            if o.start <= t < o.end and o.covers(key):
                return False
        return self.stock_of(key).up(t)

    def next_change(self, key: OfferKey, t: float) -> float:
        """The next time after ``t`` at which :meth:`available` may change for ``key``."""
        nxt = self.stock_of(key).next_flip(t)
        for o in self.outages:
            if o.covers(key):
                for b in (o.start, o.end):
                    if t < b < nxt:
                        nxt = b
        return nxt

    def offers_of(self, gpu: str) -> tuple[Offer, ...]:
        got = self.gpu_offers.get(gpu)
        if got is None:
            got = self.gpu_offers[gpu] = self.table.for_gpu(gpu)
        return got


# --- correlated capacity scenarios ----------------------------------------------------------------------------


class Outage:
    """Capacity gone for a while from a whole class of offers: a GPU type on every cloud (both markets), a
    region (every offer in it; its running workers are lost), or a region's spot market (a reclaim wave: most
    of its spot workers get a notice at once, and its spot capacity stays gone)."""

    __slots__ = (
        "name",
        "kind",
        "gpu",
        "start",
        "end",
        "cloud",
        "region",
        "affected",
        "first",
        "need",
        "after_ask",
    )

    def __init__(self, name: str, kind: str, start: float, hours: float, gpu: str | None = None) -> None:
        self.name, self.kind, self.gpu = name, kind, gpu
        self.start, self.end = start, start + hours * 3600.0
        self.cloud: str | None = None
        self.region: str | None = None  # the (cloud, region) is picked when it fires: the busiest one
        self.affected: set[int] = set()  # pools it hits
        self.first: dict[int, float] = {}  # pool -> time to its first worker on the next tier
        self.need: dict[int, float] = {}  # pool -> when it first asked for a worker during the outage
        self.after_ask: dict[int, float] = {}  # pool -> from then to its first worker on the next tier

    def covers(self, key: OfferKey) -> bool:
        if self.kind == "gpu":
            return key.gpu == self.gpu
        if key.cloud != self.cloud or key.region != self.region:
            return False
        return self.kind == "region" or key.market == SPOT

    def escapes(self, w: Worker) -> bool:
        """Whether ``w`` is a worker on the next tier: one this outage does not cover."""
        return not self.covers(w.key)


SPOT_WAVE_P = 0.8  # share of a region's spot workers a reclaim wave takes


class Scenarios:
    """The correlated outages of a run, and for each the time its pools took to get a worker on the next
    tier (another GPU type, another region, or off the region's spot market)."""

    STANDARD = (
        ("L4 out on every cloud, 1 h", "gpu", 3.0, 1.0, "L4"),
        ("H100 out on every cloud, 6 h", "gpu", 8.0, 6.0, "H100"),
        ("busiest region down, 2 h", "region", 12.0, 2.0, None),
        ("spot reclaim wave in the busiest spot region, 1 h", "spot-wave", 17.0, 1.0, None),
    )

    def __init__(self, outages: Sequence[Outage] = ()) -> None:
        self.outages = list(outages)
        self.live: list[Outage] = []  # fired, not yet over

    @classmethod
    def standard(cls, horizon_h: float) -> Scenarios:
        """The standard set, its start times scaled into a run shorter than a day."""
        k = min(horizon_h / 24.0, 1.0)
        return cls([Outage(n, kind, 3600.0 * h0 * k, h * k, gpu) for n, kind, h0, h, gpu in cls.STANDARD])

    def schedule(self, sim: Sim) -> None:
        for o in self.outages:
            sim.push(o.start, SCENARIO, o)

    def fire(self, sim: Sim, o: Outage, t: float) -> None:
        if o.kind != "gpu":
            count: dict[tuple[str, str], int] = {}
            for p in sim.pools:
                for w in [*p.ready, *p.starting.values()]:
                    if o.kind == "region" or w.market == SPOT:
                        k = (w.key.cloud, w.key.region)
                        count[k] = count.get(k, 0) + 1
            if not count:
                return
            o.cloud, o.region = max(sorted(count), key=lambda k: count[k])
            o.name += f" ({o.cloud} {o.region})"
        sim.cloud.outages.append(o)
        for p in sim.pools:
            p.opt_cache = (-1.0, -1.0, 0.0, 0.0)
            hit = [w for w in [*p.ready, *p.starting.values()] if o.covers(w.key)]
            if o.kind == "gpu":
                if p.tiers[0].type == o.gpu and any(tr.type != o.gpu for tr in p.tiers):
                    o.affected.add(p.i)
            elif hit:
                o.affected.add(p.i)
            for w in hit:
                if o.kind == "region":
                    sim.on_notice(w, t, notice_s=0.0, preemption=False)
                elif o.kind == "spot-wave" and sim.rng.random() < SPOT_WAVE_P:
                    sim.on_notice(w, t)
        self.live.append(o)
        for p in sim.pools:
            if p.i in o.affected:
                sim.step(p, t)

    def on_submitted(self, p: Pool, t: float) -> None:
        for o in self.live:
            if t < o.end and p.i in o.affected and p.i not in o.need:
                o.need[p.i] = t

    def on_launched(self, p: Pool, w: Worker, t: float) -> None:
        for o in self.live:
            if t >= o.end:
                continue
            if p.i in o.affected and p.i not in o.first and o.escapes(w):
                o.first[p.i] = t - o.start
                # asked: the pool's first launch during the outage, or this one's (if submitted before)
                asked = max(o.start, min(o.need.get(p.i, math.inf), w.submitted))
                o.need[p.i] = asked
                o.after_ask[p.i] = t - asked

    def report(self) -> list[dict[str, Any]]:
        out = []
        for o in self.outages:
            got = sorted(o.first.values())
            # from the pool's first launch during the outage (a pool whose workers kept running may ask later)
            asked = sorted(o.after_ask.values())

            def q(x: float, got: list[float] = got) -> float | None:
                return got[min(int(x * len(got)), len(got) - 1)] if got else None

            out.append(
                {
                    "scenario": o.name,
                    "start_h": o.start / 3600.0,
                    "hours": (o.end - o.start) / 3600.0,
                    "pools_hit": len(o.affected),
                    "pools_moved": len(got),
                    "next_tier_p50_s": q(0.5),
                    "next_tier_p90_s": q(0.9),
                    "next_tier_max_s": got[-1] if got else None,
                    "pools_asked": len(o.need),
                    "after_ask_p50_s": q(0.5, asked),
                    "after_ask_p90_s": q(0.9, asked),
                    "after_ask_max_s": asked[-1] if asked else None,
                }
            )
        return out


# --- workload ----------------------------------------------------------------------------------------------

ONLINE_SMALL = (["L4", "A10", "T4"], ["T4", "L4"], ["A10", "L4"], ["L40S", "A10"], ["L4"], ["A10"])
ONLINE_LARGE = (["H100", "A100-80GB"], ["A100-80GB", "H100"], ["H100"], ["L40S", "A100-80GB"])
BATCH = (
    ["A100-80GB", "H100"],
    ["H100", "A100-80GB"],
    ["L4", "T4"],
    ["A10", "L4"],
    ["V100", "T4"],
    ["H100:8", "A100-80GB:8"],
    ["L4:4", "A10:4"],
)


class Worker:
    __slots__ = (
        "id",
        "pool",
        "key",
        "market",
        "price",
        "cloud",
        "launched",
        "ready_at",
        "state",
        "idle_since",
        "end",
        "floor",
        "submitted",
        "holding",
    )

    def __init__(self, wid: str, pool: Pool, c: Candidate, t: float, ready_at: float) -> None:
        self.id = wid
        self.pool = pool
        self.key = c.key
        self.market = c.market
        self.price = c.price
        self.cloud = c.offer.cloud
        self.launched = t
        self.ready_at = ready_at
        self.state = 0  # 0 starting, 1 ready, 2 draining (noticed), 3 gone
        self.idle_since: float | None = None
        pool.views[wid] = WorkerView(wid, "starting", t, None, 0, c.price)
        self.submitted = t  # when its launch was submitted (its walk may have waited and tried others first)
        self.holding: list[tuple[float, int]] = []  # tracked inputs it runs: (finish time, input id)
        self.end = math.inf
        self.floor = False  # one of the pool's min_on_demand on-demand workers (see Sim.refloor)


class Launch:
    """One worker's launch in flight (``Reconciler._launch``): its walk over placement's candidates."""

    __slots__ = (
        "id",
        "pool",
        "submitted",
        "started",
        "force_od",
        "replaces",
        "gen",
        "now",
        "cand",
        "ok",
        "quota",
        "per_cloud",
        "worker",
        "done",
    )

    def __init__(self, lid: str, pool: Pool, t: float, force_od: bool) -> None:
        self.id = lid
        self.pool = pool
        self.submitted = t
        self.started = t
        self.force_od = force_od
        self.replaces: str | None = None
        self.gen: Iterator[Candidate] | None = None
        self.now = t  # the walk's clock: its rankings and block checks read it
        self.cand: Candidate | None = None  # the candidate whose launch call is in flight
        self.ok = self.quota = False  # that call's outcome, decided when it is made
        self.per_cloud: dict[str, int] = {}  # failed tries of this walk per cloud (the spacing between tries)
        self.worker: Worker | None = None
        self.done = False  # its walk has ended


def _cand_key(c: Candidate) -> OfferKey:
    return c.key


def _dispatch_key(w: Worker) -> tuple[float, float]:
    """Inputs go to the cheapest first, the oldest among equals; the on-demand floor counts as free (it is
    paid for whether it works or not): ``scaling_rules.dispatch_key``, the control plane's hand-off order."""
    return dispatch_key(w.price, w.floor, w.launched)


class Pool:
    __slots__ = (
        "i",
        "kind",
        "tiers",
        "spot",
        "min_od",
        "settings",
        "target",
        "max_inputs",
        "service_s",
        "startup_s",
        "peak_rate",
        "diurnal_lo",
        "phase",
        "spikes",
        "burst_per_h",
        "burst_median",
        "max_price",
        "mstate",
        "starting",
        "ready",
        "draining",
        "by_id",
        "views",
        "m",
        "slots",
        "acc",
        "acc_t",
        "acc_ws",
        "acc_cost",
        "t0",
        "queue",
        "queued",
        "carry",
        "inflight",
        "last_active",
        "token",
        "launch_after",
        "launch_fails",
        "price_sum",
        "od_ready",
        "opt_cands",
        "opt_cache",
        "yards",
        "optd",
        "yard_bins",
        "floor_min",
        "floor_buf",
        "floor_max",
        "svc_est",
        "boots",
        "boot_est",
        "launching",
        "od_launching",
        "replacing",
        "cost",
        "paid",
        "rng",
        "bin_b",
        "bin_n",
        "bin_taken",
        "entered",
        "started_seq",
        "tq",
        "retry",
        "rr",
    )

    # set by make_pools
    kind: str
    tiers: tuple[GpuTier, ...]
    spot: SpotMode
    min_od: int
    settings: AutoscalerSettings
    target: int
    max_inputs: int
    service_s: float
    startup_s: float
    peak_rate: float
    diurnal_lo: float
    phase: float
    burst_per_h: float
    burst_median: float
    max_price: float | None

    def __init__(self, i: int) -> None:
        self.i = i
        self.mstate = PoolMarketState()
        self.starting: dict[str, Worker] = {}
        self.ready: list[Worker] = []  # cheapest first, then oldest; the busy ones are ready[:m]
        self.draining: list[Worker] = []
        self.by_id: dict[str, Worker] = {}
        self.views: dict[str, WorkerView] = {}  # what the autoscaler sees of each live worker
        self.m = 0
        self.slots = 0  # ready workers × max_inputs
        self.acc = 0.0  # slot-seconds available since the step began
        self.acc_t = 0.0
        self.acc_ws = 0.0  # ready worker-seconds since the step began
        self.acc_cost = 0.0  # their $/h × seconds
        self.t0 = 0.0
        self.queue: deque[list[float]] = deque()  # [arrival time, count] cohorts, FIFO
        self.queued = 0
        self.carry = 0.0
        self.inflight = 0
        self.last_active: float | None = None
        self.token = 0
        self.launch_after = 0.0
        self.launch_fails = 0
        self.price_sum = 0.0  # $/h of ready workers
        self.od_ready = 0  # ready on-demand workers
        self.opt_cands: list[tuple[float, OfferKey, float]] = []  # (price, offer, boot s), placement order
        self.opt_cache = (-1.0, -1.0, 0.0, 0.0)  # (valid from, valid until, price, boot s)
        self.yards = {d: Yard() for d in DEFINITIONS}  # the feasible optimum's state, per definition
        self.optd = dict.fromkeys(DEFINITIONS, 0.0)  # this pool's feasible optimum, per definition ($)
        self.yard_bins: deque[tuple[int, int]] = deque()  # arrival bins not yet in the optimum: (bin, count)
        self.floor_min = self.floor_buf = (
            0  # the declared min_containers, buffer_containers (set in _init_opt)
        )
        self.floor_max = math.inf  # max_containers (the cap wins, as in the autoscaler)
        self.svc_est: float | None = None  # what the autoscaler is told: mean service time of served inputs
        self.boots: deque[float] = deque(maxlen=BOOT_SAMPLES)  # launch → ready of recent workers
        self.boot_est: float | None = None  # their median
        self.launching = 0  # launches submitted whose walk has not ended (the reconciler's ``_launching``)
        self.od_launching = 0  # of which forced on demand (the min_on_demand floor)
        self.replacing: dict[str, str] = {}  # launch id -> the on-demand worker its spot worker replaces
        self.cost = self.paid = 0.0  # $: billed, busy time at the price paid
        self.rng = random.Random(i)  # this pool's inputs (reseeded by make_pools)
        self.bin_b = -1  # the arrival bin being consumed, its count, and how many of it have arrived
        self.bin_n = self.bin_taken = 0
        self.spikes: list[tuple[float, float, float]] = []
        self.entered = 0  # inputs that entered the FIFO (arrivals and map bursts): each one's position
        self.started_seq = 0  # inputs the fluid has started: positions below this have been served
        self.tq: deque[tuple[int, int]] = deque()  # tracked inputs waiting: (FIFO position, input id)
        self.retry: list[int] = []  # tracked inputs requeued by a preemption, served first
        self.rr = 0  # round robin over the busy workers, for tracked inputs

    def od_starting(self) -> bool:
        return any(w.market == OD for w in self.starting.values())

    def rate(self, t: float) -> float:
        """Online arrivals per second at ``t``."""
        if self.peak_rate <= 0.0:
            return 0.0
        d = self.diurnal_lo + (1.0 - self.diurnal_lo) * 0.5 * (
            1.0 - math.cos(2 * math.pi * (t / DAY - self.phase))
        )
        r = self.peak_rate * d
        for a, b, f in self.spikes:
            if a <= t < b:
                r *= f
        return r


def make_pools(n: int, rng: random.Random) -> list[Pool]:
    """``n`` pools drawn from ``rng`` (pool i depends only on draws before it: a smaller run is a prefix)."""
    pools = []
    for i in range(n):
        p = Pool(i)
        u = rng.random()
        p.kind = "online" if u < 0.65 else "batch"
        p.spot = rng.choices(("allow", "never", "require"), (0.85, 0.10, 0.05))[0]
        p.min_od = 1 if p.spot == "allow" and rng.random() < 0.1 else 0
        p.max_price = None
        if p.kind == "online":
            large = rng.random() < 0.3
            p.tiers = parse_gpu(rng.choice(ONLINE_LARGE if large else ONLINE_SMALL))
            if large:  # LLM-style serving: seconds per request, many at once
                p.service_s = rng.uniform(2.0, 15.0)
                p.max_inputs = rng.choice((4, 8, 16, 32))
            else:  # embeddings, vision, speech: sub-second to seconds
                p.service_s = rng.uniform(0.2, 2.0)
                p.max_inputs = rng.choice((1, 1, 4, 8, 16))
            # @concurrent(max_inputs=M, target_inputs=T): scale on T, burst to M (half the concurrent pools)
            p.target = p.max_inputs if p.max_inputs == 1 or rng.random() < 0.5 else round(0.75 * p.max_inputs)
            peak_workers = min(rng.lognormvariate(math.log(9.0), 0.9), 400.0)
            p.peak_rate = peak_workers * p.target / p.service_s
            p.diurnal_lo = rng.uniform(0.15, 0.45)
            p.phase = rng.choice((0.0, 0.0, 0.0, 1 / 3, 2 / 3)) + rng.uniform(-0.05, 0.05) + 0.35
            for _ in range(rng.randint(1, 6)):
                a = rng.uniform(0, DAY)
                p.spikes.append((a, a + rng.uniform(300, 1200), rng.uniform(1.5, 3.0)))
            p.burst_per_h = 0.0
            p.burst_median = 0.0
            mn = rng.choices((0, 1, 2), (0.7, 0.2, 0.1))[0]
            mx = None if rng.random() < 0.15 else max(int(peak_workers * rng.uniform(2, 4)), mn + 1)
            p.settings = AutoscalerSettings(
                min_containers=mn,
                max_containers=mx,
                buffer_containers=rng.choices((0, 1), (0.8, 0.2))[0],
                scaledown_window=rng.choices((60, 300, 600), (0.5, 0.35, 0.15))[0],
            )
        else:
            p.tiers = parse_gpu(rng.choice(BATCH))
            p.target = p.max_inputs = 1
            p.peak_rate = 0.0
            p.diurnal_lo, p.phase = 0.3, 0.35
            p.burst_per_h = rng.uniform(2, 12) / 24.0
            if p.tiers[0].count >= 4:  # multi-GPU nodes: fewer, longer inputs (shards, fine-tunes), few nodes
                p.service_s = rng.uniform(300.0, 1800.0)
                p.burst_median = rng.lognormvariate(math.log(40.0), 0.5)
                cap = rng.choice((4, 8, 16))
            else:  # single GPU: embedding, transcription, rendering maps
                p.service_s = rng.uniform(5.0, 60.0)
                p.burst_median = rng.lognormvariate(math.log(2000.0), 0.5)
                cap = rng.choice((25, 50, 100, 200))
            # Sized so that the cap drains a day's maps with room to spare (≤ 25% busy on average).
            work_per_s = p.burst_per_h / 3600.0 * p.burst_median * math.exp(BURST_SIGMA**2 / 2) * p.service_s
            p.settings = AutoscalerSettings(
                min_containers=0,
                max_containers=max(cap, math.ceil(4 * work_per_s)),
                buffer_containers=0,
                scaledown_window=60,
            )
        p.startup_s = rng.uniform(20.0, 90.0)
        p.rng = random.Random(rng.getrandbits(64))
        pools.append(p)
    return pools


# --- wait-time histogram -----------------------------------------------------------------------------------

BINS_PER_DECADE = 20
LOG_MIN = -2.0  # 10 ms; waits below go to bin 0


class Hist:
    def __init__(self) -> None:
        self.w = [0.0] * (BINS_PER_DECADE * 8 + 2)
        self.total = 0.0
        self.sum = 0.0
        self.max = 0.0

    def add(self, wait: float, weight: float) -> None:
        if weight <= 0:
            return
        if wait < 0.01:
            i = 0
            wait = 0.0
        else:
            i = min(int((math.log10(wait) - LOG_MIN) * BINS_PER_DECADE) + 1, len(self.w) - 1)
        self.w[i] += weight
        self.total += weight
        self.sum += wait * weight
        if wait > self.max:
            self.max = wait

    def add_ramp(self, w0: float, w1: float, n: float) -> None:
        """``n`` inputs whose waits run linearly from ``w0`` to ``w1`` (clamped at 0)."""
        if n <= 0:
            return
        if w0 < 0.01 and w1 < 0.01:  # served on arrival: the common case
            self.w[0] += n
            self.total += n
            return
        k = 1 if n < 4 or abs(w1 - w0) < 0.5 else 4
        for j in range(k):
            w = w0 + (w1 - w0) * (j + 0.5) / k
            self.add(w if w > 0 else 0.0, n / k)

    @staticmethod
    def merged(hists: Any) -> Hist:
        out = Hist()
        for h in hists:
            out.w = [a + b for a, b in zip(out.w, h.w, strict=True)]
            out.total += h.total
            out.sum += h.sum
            out.max = max(out.max, h.max)
        return out

    def quantile(self, q: float) -> float:
        if self.total <= 0:
            return 0.0
        need, cum = q * self.total, 0.0
        for i, x in enumerate(self.w):
            cum += x
            if cum >= need:
                if i == 0:
                    return 0.0
                lo = 10 ** (LOG_MIN + (i - 1) / BINS_PER_DECADE)
                return lo * 10 ** (0.5 / BINS_PER_DECADE)  # geometric middle of the bin
        return self.max


# --- the feasible optimum -------------------------------------------------------------------------------------

ARRIVALS, SERVED = "arrivals", "served"
DEFINITIONS = (ARRIVALS, SERVED)
OPT_FIELDS = ("busy", "floors_idle", "startups", "kept_idle", "boots", "startups0", "kept_idle0", "boots0")


class Yard:
    """One pool's feasible optimum under one definition: the work it has not run yet, and its layers (with
    the declared floors, and without: ``layers0``) with when each was last present."""

    __slots__ = ("pending", "layers", "ends", "layers0", "ends0", "t")

    def __init__(self) -> None:
        self.t = 0.0  # computed up to here (the arrival stream's grid)
        self.pending = 0.0  # worker-seconds
        self.layers = self.layers0 = 0
        self.ends: list[float] = []
        self.ends0: list[float] = []


def optimum_parts(o: dict[str, float]) -> dict[str, float]:
    """The totals of one definition's accumulators: with the declared floors, without, and the lower bound."""
    busy = o["busy"]
    return {
        "optimum": busy + o["floors_idle"] + o["startups"] + o["kept_idle"],
        "optimum_no_floors": busy + o["startups0"] + o["kept_idle0"],
        "lower_bound": busy,
    }


# --- individually tracked inputs -------------------------------------------------------------------------------


class Tracker:
    """A sample of inputs followed one by one: every ``every``-th input to enter a pool's FIFO gets an id,
    waits in the queue until the fluid has started every input before it, runs on one of the pool's busy
    workers (round robin) for the pool's service time, and gives a result when it finishes, unless its worker
    is preempted first: then it is requeued (served first, as the control plane requeues a lost lease) and
    runs again. A drained or scaled-down worker finishes what it holds. Each result is counted per id, so
    an input that never gives a result, or gives two, shows."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.n = 0
        self.arrival: list[float] = []
        self.results: list[int] = []  # per id: results given
        self.runs: list[int] = []  # per id: times started on a worker
        self.requeued = 0
        self.retry_n = 0  # requeued inputs not yet started again (over all pools)
        self.waits: list[float] = []  # arrival → first start, per tracked input

    def enter(self, p: Pool, count: int, t_first: float, dt: float) -> None:
        """``count`` inputs enter ``p``'s FIFO, the j-th arriving at ``t_first + j·dt``."""
        e0 = p.entered
        p.entered += count
        if self.every <= 0:
            return
        k = (-(e0 + p.i)) % self.every
        while k < count:
            tid = self.n
            self.n += 1
            self.arrival.append(t_first + k * dt)
            self.results.append(0)
            self.runs.append(0)
            p.tq.append((e0 + k, tid))
            k += self.every

    def serve(self, p: Pool, t0: float, t: float, first: int, mu: float) -> None:
        """The step [t0, t) started the inputs at FIFO positions [first, p.started_seq): the tracked ones
        among them (and the requeued ones) go to the busy workers."""
        ready = p.ready
        if not ready or (not p.retry and not (p.tq and p.tq[0][0] < p.started_seq)):
            return
        busy = ready[: max(p.m, 1)]
        s = p.service_s
        todo = [(t0, tid) for tid in p.retry]
        self.retry_n -= len(p.retry)
        p.retry = []
        q = p.tq
        while q and q[0][0] < p.started_seq:
            e, tid = q.popleft()
            start = t0 + (e - first + 0.5) / mu if mu > 0 else t0
            a = self.arrival[tid]
            start = min(max(start, a), t)
            if self.runs[tid] == 0:
                self.waits.append(start - a)
            todo.append((start, tid))
        for start, tid in todo:
            w = busy[p.rr % len(busy)]
            p.rr += 1
            self.runs[tid] += 1
            w.holding.append((start + s, tid))

    def complete(self, w: Worker, upto: float = math.inf) -> None:
        """``w`` finishes the tracked inputs it holds that end by ``upto``."""
        keep = []
        for f, tid in w.holding:
            if f <= upto:
                self.results[tid] += 1
            else:
                keep.append((f, tid))
        w.holding = keep

    def requeue(self, p: Pool, w: Worker, t: float) -> None:
        """``w`` is preempted at ``t``: what it finished counts, the rest goes back to the queue."""
        self.complete(w, t)
        for _, tid in w.holding:
            p.retry.append(tid)
            self.requeued += 1
            self.retry_n += 1
        w.holding = []

    def report(self, pools: Sequence[Pool]) -> dict[str, Any]:
        once = sum(1 for r in self.results if r == 1)
        twice = sum(1 for r in self.results if r > 1)
        waiting = sum(len(p.tq) + len(p.retry) for p in pools)
        waits = sorted(self.waits)
        return {
            "tracked": self.n,
            "tracked_once": once,
            "tracked_more_than_once": twice,
            "tracked_no_result": self.n - once - twice,
            "tracked_still_queued": waiting,
            "tracked_requeued": self.requeued,
            "tracked_wait_p50_s": waits[len(waits) // 2] if waits else 0.0,
            "tracked_wait_p99_s": waits[min(int(0.99 * len(waits)), len(waits) - 1)] if waits else 0.0,
        }


# --- the simulation ----------------------------------------------------------------------------------------

STEP, READY, NOTICE, BURST, CUTOFF, WALK, SCENARIO = 0, 1, 2, 3, 4, 5, 6


class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.table = load_offer_table(args.catalog_dir)
        self.cloud = Cloud(self.table, args.seed)
        self.autoscaler = Autoscaler()
        self.tracker = Tracker(int(getattr(args, "track_every", TRACK_EVERY)))
        self.scenarios = Scenarios.standard(args.hours) if getattr(args, "scenarios", False) else Scenarios()
        self.policy = MarketPolicy(MarketSettings())
        self.blocks = BlockList()
        self.stockouts = StockoutLog()  # one per control plane, as the reconciler's
        self.lseq = 0
        self.threads_free = max(int(getattr(args, "launch_threads", LAUNCH_THREADS)), 1)
        self.walk_queue: deque[Launch] = deque()  # launches waiting for a launch thread
        self.handoffs = 0  # threads being handed on to waiting launches (see _end_walk)
        self.walk_waits: list[float] = []  # submit → walk start, per launch
        self.launches: dict[str, Launch] = {}  # launches of spot replacements, by id (until settled)
        self.horizon = args.hours * 3600.0
        self.tick = float(args.tick)
        self.no_estimates = bool(getattr(args, "no_estimates", False))
        self.pools = make_pools(args.pools, random.Random(args.seed + 1))
        self.bare = bool(getattr(args, "bare_settings", False))
        if self.bare:  # what-if: no warm floor, no buffer, the shortest window (isolates the settings' cost)
            for p in self.pools:
                p.settings = AutoscalerSettings(
                    min_containers=0, max_containers=p.settings.max_containers, buffer_containers=0
                )
        self.heap: list[tuple[float, int, int, Any, int]] = []
        self.seq = 0
        self.wseq = 0
        self.pending = 0  # queued inputs over all pools
        self.live = 0
        self.peak_live = 0
        self.peak_t = 0.0
        self.arrivals_done = False
        self.wall_at_horizon = 0.0
        c: dict[str, float] = dict.fromkeys(
            (
                "decisions",
                "placements",
                "launched",
                "launched_spot",
                "cap_fail",
                "quota_fail",
                "exhausted",
                "walks",
                "tries",
                "class_blocks",
                "probes",
                "preempted",
                "preempt_starting",
                "lost_workers",
                "requeued",
                "fallbacks",
                "restores",
                "replaced",
                "steps",
                "cost",
                "boot_cost",
                "lost_cost",
                "work_cost",
                "work_s",
                "opt_unrun_ws",
                "od_worker_s",
                "spot_worker_s",
                "inputs_in",
                "inputs_out",
            ),
            0.0,
        )
        self.c = c
        # [cost, lower bound, boot, busy, lost work, the feasible optimum's start-ups and kept-idle gaps, its
        #  declared floors' idle part, the start-ups and kept-idle gaps of the optimum without the floors]
        self.by_kind = {"online": [0.0] * 5, "batch": [0.0] * 5}
        self.opt = {d: dict.fromkeys(OPT_FIELDS, 0.0) for d in DEFINITIONS}
        self.opt_kind = {
            d: {k: dict.fromkeys(OPT_FIELDS, 0.0) for k in ("online", "batch")} for d in DEFINITIONS
        }
        self.hists = {"online": Hist(), "batch": Hist()}
        n_hours = int(math.ceil(args.hours + DRAIN_LIMIT_S / 3600.0)) + 1
        self.paid_ws = [0.0] * n_hours  # worker-seconds paid, per hour of simulated time
        self.busy_ws = [0.0] * n_hours  # worker-seconds of work (the optimum's capacity), per hour
        for p in self.pools:
            self._init_opt(p)

    # -- helpers --------------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, obj: Any, token: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, token))

    def schedule_step(self, p: Pool, t: float) -> None:
        p.token += 1
        self.push(t, STEP, p, p.token)

    def _policy(self, p: Pool, mode: str) -> PlacementPolicy:
        return PlacementPolicy(spot=mode, max_price_per_hour=p.max_price)  # type: ignore[arg-type]

    def _init_opt(self, p: Pool) -> None:
        """The pool's candidates in placement order (every offer, ignoring stock): the optimum walks them."""
        got = rank(p.tiers, self.table, policy=self._policy(p, p.spot))
        nq = self.cloud.no_quota
        cands = [c for c in got.candidates if (c.key.cloud, c.key.gpu, c.market) not in nq] or list(
            got.candidates
        )
        p.opt_cands = [(c.price, c.key, self.median_boot(p, c.offer)) for c in cands]
        st = p.settings
        p.floor_min = max(st.min_containers, 0)
        p.floor_buf = max(st.buffer_containers, 0)
        p.floor_max = st.max_containers if st.max_containers is not None else math.inf

    @staticmethod
    def median_boot(p: Pool, o: Offer) -> float:
        """Launch → ready of a worker of ``p`` on ``o``, at the median of the simulated provisioning delay."""
        return BOOT_MEDIAN_S.get(o.cloud, 120.0) + (60.0 if o.gpu_count >= 8 else 0.0) + p.startup_s

    def opt_offer(self, p: Pool, t: float) -> tuple[float, float]:
        """($/h, boot s) of the first offer in placement order that is in stock with quota at ``t``."""
        lo, hi, price, boot = p.opt_cache
        if lo <= t < hi:
            return price, boot
        until = math.inf
        cloud = self.cloud
        chosen = (p.opt_cands[0][0], p.opt_cands[0][2]) if p.opt_cands else (0.0, 0.0)
        for price, key, boot in p.opt_cands:
            nf = cloud.next_change(key, t)
            if nf < until:
                until = nf
            if cloud.available(key, t):
                chosen = (price, boot)
                break
        p.opt_cache = (t, until, *chosen)
        return chosen

    def opt_price(self, p: Pool, t: float) -> float:
        return self.opt_offer(p, t)[0]

    def opt_price_s(self, p: Pool, a: float, b: float) -> float:
        """∫ p*(pool, t) dt over [a, b), in $/h × s: the cheapest feasible offer's price, piece by piece."""
        total = 0.0
        while a < b:
            price = self.opt_offer(p, a)[0]
            until = p.opt_cache[1]
            e = until if until < b else b
            total += price * (e - a)
            a = e
        return total

    def _opt_add(self, p: Pool, d: str, field: str, x: float) -> None:
        self.opt[d][field] += x
        self.opt_kind[d][p.kind][field] += x
        if field != "boots" and field[-1] != "0":
            p.optd[d] += x

    def yard_step(
        self, p: Pool, d: str, t0: float, t: float, work_in: float, capacity: float, active: bool
    ) -> None:
        """The step [t0, t) of the feasible optimum of definition ``d``: ``work_in`` worker-seconds enter,
        at most ``capacity`` run; the profile n = the worker-seconds run ÷ (t − t0), busy at p*; the declared
        floors add their idle workers, and the layers of the profile their start-ups."""
        y = p.yards[d]
        pending = y.pending + work_in
        done = capacity if capacity < pending else pending
        y.pending = pending - done
        L = t - t0
        n = done / L
        if done > 0:
            self._opt_add(p, d, "busy", done * self.opt_price(p, 0.5 * (t0 + t)) / 3600.0)
        lo, buf = p.floor_min, p.floor_buf
        if lo or buf:
            # The declared floors: min_containers at all times; buffer_containers beyond the load while there
            # is work in the step; max_containers wins, as in the autoscaler.
            want = n + buf if active or pending > 0 else 0.0
            f = min(want if want > lo else lo, p.floor_max)
            if f > n:
                self.opt_floor(p, d, t0, t, f - n)
            else:
                f = n
            self.opt_layers(p, d, t0, f)
            self.opt_layers(p, d, t0, n, floors=False)
        else:
            self.opt_layers(p, d, t0, n, both=True)

    def advance_yard(self, p: Pool, t: float) -> None:
        """The feasible optimum on the arrival stream, up to the last ``ARRIVAL_BIN_S`` boundary before ``t``,
        on a fixed grid of those bins (so it does not depend on when the policy steps the pool): each bin's
        arrivals enter at its start (a map at the start of the bin it came in), a worker serving
        ``max_inputs`` at once, and run at once as far as ``max_containers`` allows. Runs of empty bins with
        nothing pending are one step (the profile is flat there)."""
        B = ARRIVAL_BIN_S
        y = p.yards[ARRIVALS]
        a = y.t
        end = math.floor(t / B) * B
        bins = p.yard_bins
        s, m = p.service_s, p.max_inputs
        while a < end:
            if y.pending <= 0 and (not bins or bins[0][0] * B > a):
                nxt = min(bins[0][0] * B if bins else end, end)
                if nxt > a:
                    self.yard_step(p, ARRIVALS, a, nxt, 0.0, 0.0, False)
                    a = nxt
                    continue
            work = 0.0
            if bins and bins[0][0] * B <= a:
                work = bins.popleft()[1] * s / m
            self.yard_step(p, ARRIVALS, a, a + B, work, p.floor_max * B, work > 0 or y.pending > 0)
            a += B
        y.t = a

    def opt_floor(self, p: Pool, d: str, a: float, b: float, idle: float) -> None:
        """The declared floors' idle part of the feasible optimum: ``idle`` workers over [a, b) at p*."""
        self._opt_add(p, d, "floors_idle", idle * self.opt_price_s(p, a, b) / 3600.0)

    def opt_layers(
        self, p: Pool, d: str, t0: float, n: float, floors: bool = True, both: bool = False
    ) -> None:
        """The feasible optimum's start-ups: the profile ``n`` (workers) of the step beginning at ``t0``, as
        layers k = 1, 2, … (layer k is present while n > k − 1). A layer that appears pays one start-up at
        the cheapest feasible offer, or, if it was present before, the cheaper of a start-up and keeping its
        worker idle through the gap: min(gap, boot) × $/h (ski rental, with the future known).

        ``floors``: the profile with the pool's declared floors (the feasible optimum), else the busy profile
        alone (the optimum without the floors). ``both``: the two profiles are the same (a pool without
        floors), so the start-ups are counted for both from the first one's layers."""
        y = p.yards[d]
        c = math.ceil(n - 1e-9) if n > 1e-9 else 0
        prev = y.layers if floors else y.layers0
        if c == prev:
            return
        ends = y.ends if floors else y.ends0
        if c < prev:
            for k in range(c, prev):
                ends[k] = t0
        else:
            price, boot = self.opt_offer(p, t0)
            boot_s = gap_s = 0.0
            for k in range(prev, c):
                if k < len(ends):
                    gap = t0 - ends[k]
                    if gap < boot:
                        gap_s += gap
                        continue
                else:
                    ends.append(t0)
                boot_s += boot
            boots = boot_s / boot if boot > 0 else 0.0
            for suffix, yes in (("", floors), ("0", both or not floors)):
                if yes:
                    self._opt_add(p, d, "startups" + suffix, boot_s * price / 3600.0)
                    self._opt_add(p, d, "kept_idle" + suffix, gap_s * price / 3600.0)
                    self._opt_add(p, d, "boots" + suffix, boots)
        if floors:
            y.layers = c
        else:
            y.layers0 = c

    def spot_workers(self, p: Pool) -> int:
        n = sum(1 for w in p.ready if w.market == SPOT)
        return n + sum(1 for w in p.starting.values() if w.market == SPOT)

    # -- workers --------------------------------------------------------------------------------------------
    def _acc(self, p: Pool, t: float) -> None:
        dt = t - p.acc_t
        p.acc += p.slots * dt
        p.acc_ws += len(p.ready) * dt
        p.acc_cost += p.price_sum * dt
        p.acc_t = t

    def _bill(self, w: Worker, t_end: float) -> None:
        c = self.c
        alive = max(t_end - w.launched, 0.0)
        c["cost"] += w.price * alive / 3600.0
        k = self.by_kind[w.pool.kind]
        w.pool.cost += w.price * alive / 3600.0
        k[0] += w.price * alive / 3600.0
        k[2] += w.price * max(min(w.ready_at, t_end) - w.launched, 0.0) / 3600.0
        c["boot_cost"] += w.price * max(min(w.ready_at, t_end) - w.launched, 0.0) / 3600.0
        c["spot_worker_s" if w.market == SPOT else "od_worker_s"] += alive
        paid_ws, a = self.paid_ws, w.launched
        while a < t_end:
            h = int(a // 3600.0)
            b = min((h + 1) * 3600.0, t_end)
            if h < len(paid_ws):
                paid_ws[h] += b - a
            a = b
        w.end = t_end
        w.state = 3
        self.live -= 1
        del w.pool.by_id[w.id]
        del w.pool.views[w.id]

    def _remove_ready(self, p: Pool, w: Worker, t: float) -> bool:
        """Take a ready worker out of service; returns whether it was busy."""
        self._acc(p, t)
        i = p.ready.index(w)
        busy = i < p.m
        if busy:
            p.m -= 1
        del p.ready[i]
        p.slots -= p.max_inputs
        p.price_sum -= w.price
        if w.market == OD:
            p.od_ready -= 1
        if w.floor:
            w.floor = False
            self.refloor(p, t)
        return busy

    def stop(self, p: Pool, w: Worker, t: float, *, finish: bool = False) -> None:
        """Stop a worker now (scale-down, cancel, replaced). ``finish``: a busy one finishes its inputs."""
        if w.state == 0:
            del p.starting[w.id]
            self._bill(w, t)
        elif w.state == 1:
            busy = self._remove_ready(p, w, t)
            extra = 0.0
            if busy and finish:
                extra = p.service_s
                p.acc += p.max_inputs * p.service_s  # it finishes what it holds (served in this step)
            if w.holding:  # a drained worker finishes its tracked inputs, and is paid until it has
                extra = max(extra, max(f for f, _ in w.holding) - t)
                self.tracker.complete(w)
            self._bill(w, t + extra)

    def launch(self, p: Pool, n: int, t: float, *, on_demand: int = 0) -> list[Launch]:
        """Submit ``n`` launches as the reconciler's ``_scale`` does: one walk per worker (each with its own
        rankings), the first ``on_demand`` forced on demand (the ``min_on_demand`` floor)."""
        out = []
        for i in range(n):
            out.append(self.submit(p, t, force_od=i < on_demand))
        return out

    def submit(self, p: Pool, t: float, *, force_od: bool = False) -> Launch:
        """One launch (``Reconciler._launch``): counted at once as a starting worker of the pool, walked on one
        of the ``LAUNCH_THREADS`` launch threads as soon as one is free."""
        self.lseq += 1
        L = Launch(f"l{self.lseq}", p, t, force_od)
        p.launching += 1
        if force_od:
            p.od_launching += 1
        if self.scenarios.live:
            self.scenarios.on_submitted(p, t)
        if self.threads_free > 0:
            self.threads_free -= 1
            self._begin_walk(L, t)
        else:
            self.walk_queue.append(L)
        return L

    def _begin_walk(self, L: Launch, t: float) -> None:
        p = L.pool
        L.started = t
        self.c["walks"] += 1
        self.walk_waits.append(t - L.submitted)

        def ranked() -> list[Candidate]:
            # the market is chosen at each ranking, as the launcher's ``_cloud_choices`` does
            mode = launch_mode(p.spot, self.policy, p.mstate, L.now, on_demand=L.force_od)
            return self._rank(p, mode, L.now)

        def blocked(c: Candidate) -> bool:
            return c.key in self.blocks.active(L.now)

        L.now = t
        L.gen = launch_walk(ranked, _cand_key, blocked, MAX_LAUNCH_TRIES)
        self._advance(L, t)

    def on_walk(self, L: Launch, t: float) -> None:
        """The answer of a launch call arrives: a worker starts, or the failure blocks what it rules out and
        the walk goes on."""
        p, c = L.pool, self.c
        cand, L.cand = L.cand, None
        assert cand is not None
        key = cand.key
        if L.ok:
            w = self._start_worker(p, cand, t, L)
            if record_launch_success(self.policy, p.mstate, key, cand.market, t, stockouts=self.stockouts):
                c["restores"] += 1
            p.launch_fails = 0
            self.scenarios.on_launched(p, w, t)
            self._end_walk(L, t)
            return
        quota = L.quota
        c["quota_fail" if quota else "cap_fail"] += 1
        L.per_cloud[cand.offer.cloud] = L.per_cloud.get(cand.offer.cloud, 0) + 1
        offers = self.cloud.offers_of(key.gpu)
        got = record_launch_failure(
            self.policy,
            self.blocks,
            p.mstate,
            key,
            cand.market,
            t,
            "QuotaExceededError" if quota else "NoCapacityError",
            quota=quota,
            capacity=not quota,
            quota_offers=offers,
            stockouts=self.stockouts,
            class_offers=offers,
        )
        c["class_blocks"] += len(got.classes)
        if got.spot_fallback:
            c["fallbacks"] += 1
        self._advance(L, t)

    def _advance(self, L: Launch, t: float) -> None:
        """The walk's next try: placement's next candidate (re-ranked when a list runs out), after the
        launcher's spacing between failed tries on one cloud; the call answers after ``LAUNCH_CALL_S``."""
        L.now = t
        assert L.gen is not None
        cand = next(L.gen, None)
        if cand is None:
            p = L.pool
            self.c["exhausted"] += 1
            p.launch_fails += 1
            p.launch_after = t + launch_backoff(p.launch_fails)
            self._end_walk(L, t)
            return
        cloud = cand.offer.cloud
        at = t + launch_spacing(L.per_cloud.get(cloud, 0))
        key = cand.key
        L.quota = (key.cloud, key.gpu, key.market) in self.cloud.no_quota
        L.ok = not L.quota and self.cloud.available(key, at)
        L.cand = cand
        call = LAUNCH_CALL_S.get(cloud, 2.0) * (1.0 if L.ok else LAUNCH_FAIL_FACTOR)
        self.c["tries"] += 1
        self.push(at + call, WALK, L)

    def _end_walk(self, L: Launch, t: float) -> None:
        p = L.pool
        p.launching -= 1
        if L.force_od:
            p.od_launching -= 1
        L.gen = None
        L.done = True
        if not self.walk_queue:
            self.threads_free += 1
            return
        # The thread takes the next launch waiting. A walk that ends at once (nothing to try) hands its thread
        # on in turn: the outermost call runs that chain as a loop, not as a recursion.
        self.handoffs += 1
        if self.handoffs > 1:
            return
        while self.handoffs and self.walk_queue:
            self._begin_walk(self.walk_queue.popleft(), t)
            self.handoffs -= 1
        self.threads_free += self.handoffs  # (none: a hand-off finds the queue non-empty)
        self.handoffs = 0

    # -- the rules of scaling_rules, on the simulated pool -------------------------------------------------
    @staticmethod
    def _pool_worker(w: Worker, wid: str | None = None) -> PoolWorker:
        state = ("starting", "ready", "draining", "stopped")[w.state]
        return PoolWorker(wid or w.id, state, w.market, w.price, w.launched)

    def _od_workers(self, p: Pool) -> list[PoolWorker]:
        """The pool's live on-demand workers, as the rules see them (the floor, the on-demand launches and
        the move back to spot look at no other worker, so the rest is left out, for speed)."""
        pw = self._pool_worker
        return [pw(w) for w in p.ready if w.market == OD] + [
            pw(w) for w in p.starting.values() if w.market == OD
        ]

    def settle(self, p: Pool, t: float) -> None:
        """``settle_replacements``: drain each on-demand worker whose spot replacement is ready; forget the
        replacements that failed, stopped or came up on demand (the old worker stays)."""
        by_launch = {lid: self.launches[lid] for lid in p.replacing}
        workers = {w.id: self._pool_worker(w) for w in [*p.ready, *p.starting.values()]}
        for lid, L in by_launch.items():  # the replacement by its launch's id, as the reconciler names it
            if L.worker is not None and L.worker.state in (0, 1):
                workers[lid] = self._pool_worker(L.worker, lid)

        def state_of(lid: str) -> str | None:
            L = by_launch.get(lid)
            if L is None:
                return None
            if L.worker is None:
                return "stopped" if L.done else "starting"
            return ("starting", "ready", "draining", "stopped")[L.worker.state]

        drain, done = settle_replacements(p.replacing, workers, state_of)
        for lid in done:
            del p.replacing[lid]
            self.launches.pop(lid, None)
        for _new, old in drain:
            w = p.by_id.get(old)
            if w is not None:
                self.stop(p, w, t, finish=True)
                self.c["replaced"] += 1

    def move_back_to_spot(self, p: Pool, t: float) -> None:
        """The reconciler's ``_move_back_to_spot`` (``scaling_rules.move_back_to_spot``): a fallen-back pool
        probes spot with one extra worker when a probe is due; otherwise an on-demand worker above the floor
        is replaced by a spot one, the old one draining once its replacement is ready (:meth:`settle`)."""

        def spot_price() -> float | None:
            mode = launch_mode(p.spot, self.policy, p.mstate, t)
            best = next((c for c in self._rank(p, mode, t) if c.market == SPOT), None)
            return best.price if best is not None else None

        move = move_back_to_spot(
            self.policy,
            p.mstate,
            self._od_workers(p),
            p.min_od,
            spot_price,
            t,
            leaving=set(p.replacing.values()),
        )
        if move.probe:
            self.c["probes"] += 1
            self.submit(p, t)
        for wid in move.replace:
            L = self.submit(p, t)
            L.replaces = wid
            p.replacing[L.id] = wid
            self.launches[L.id] = L

    def refloor(self, p: Pool, t: float) -> None:
        """``scaling_rules.on_demand_floor``: the pool's ``min_on_demand`` cheapest, then oldest, live
        on-demand workers form the floor (recomputed as the reconciler does each tick); the ready list keeps
        dispatch's order (``dispatch_key``), the busy set following it."""
        ids = on_demand_floor(p.min_od, self._od_workers(p))
        changed = False
        for w in p.ready:
            f = w.id in ids
            if f != w.floor:
                w.floor = f
                changed = True
        for w in p.starting.values():
            w.floor = w.id in ids
        if not changed:
            return
        busy = set(map(id, p.ready[: p.m]))
        p.ready.sort(key=_dispatch_key)
        for k, x in enumerate(p.ready):
            now_busy = k < p.m
            x.idle_since = None if now_busy else (x.idle_since if id(x) not in busy else t)
            p.views[x.id] = WorkerView(
                x.id, "ready", x.launched, x.idle_since, 1 if now_busy else 0, x.price, x.floor
            )

    def _rank(self, p: Pool, mode: str, t: float) -> list[Candidate]:
        self.c["placements"] += 1
        got = rank(
            p.tiers, self.table, policy=self._policy(p, mode), blocked=self.blocks.active(t), limit=RANK_LIMIT
        )
        return list(got.candidates)

    def _start_worker(
        self, p: Pool, cand: Candidate, t: float, launch: Launch | None, ready_at: float | None = None
    ) -> Worker:
        rng, c = self.rng, self.c
        o = cand.offer
        if ready_at is None:
            boot = BOOT_MEDIAN_S.get(o.cloud, 120.0) * rng.lognormvariate(0.0, 0.35)
            if o.gpu_count >= 8:
                boot += 60.0
            ready_at = t + boot + p.startup_s
        self.wseq += 1
        w = Worker(f"w{self.wseq}", p, cand, t, ready_at)
        if launch is not None:
            launch.worker = w
            w.submitted = launch.submitted
        p.starting[w.id] = w
        p.by_id[w.id] = w
        self.live += 1
        if self.live > self.peak_live:
            self.peak_live, self.peak_t = self.live, t
        c["launched"] += 1
        if ready_at > t:
            self.push(ready_at, READY, w)
        if cand.market == SPOT:
            c["launched_spot"] += 1
            rate = PREEMPT_PER_H.get(o.cloud, 0.03) * (
                2.0 if scarcity(o.gpu, o.gpu_count) == "scarce" else 1.0
            )
            at = t + rng.expovariate(rate / 3600.0)
            limit = self.horizon + DRAIN_LIMIT_S
            for d in self.cloud.stock_of(cand.key).downs(t, min(at, limit)):
                if rng.random() < WAVE_P:
                    at = d
                    break
            if at < limit:
                self.push(at, NOTICE, w)
        return w

    def on_ready(self, w: Worker, t: float) -> None:
        if w.state != 0:
            return
        p = w.pool
        del p.starting[w.id]
        self._acc(p, t)
        w.state = 1
        w.idle_since = t
        if t > w.launched:  # not a warm-start worker: launch → ready is a sample of the pool's start-up
            p.boots.append(t - w.submitted)
            p.boot_est = sorted(p.boots)[len(p.boots) // 2]
        # Inputs go to the cheapest ready workers first (the control plane hands an input to the cheapest
        # parked worker), the oldest among equals: the ready list is kept in that order.
        i = bisect.bisect(p.ready, _dispatch_key(w), key=_dispatch_key)
        p.ready.insert(i, w)
        if i < p.m:  # it takes the work of the dearest busy worker, which goes idle
            out = p.ready[p.m]
            out.idle_since = t
            p.views[out.id] = WorkerView(out.id, "ready", out.launched, t, 0, out.price, out.floor)
            w.idle_since = None
            p.views[w.id] = WorkerView(w.id, "ready", w.launched, None, 1, w.price, w.floor)
        else:
            p.views[w.id] = WorkerView(w.id, "ready", w.launched, t, 0, w.price, w.floor)
        p.slots += p.max_inputs
        p.price_sum += w.price
        if w.market == OD:
            p.od_ready += 1
        if p.min_od:
            self.refloor(p, t)
        if p.replacing:  # the reconciler's next tick settles the replacements (a second, not a step, away)
            self.settle(p, t)

    def on_notice(self, w: Worker, t: float, notice_s: float | None = None, preemption: bool = True) -> None:
        """A spot worker's preemption notice (or, ``preemption`` False, a worker lost with its region)."""
        if w.state not in (0, 1):
            return
        p = w.pool
        c = self.c
        c["preempted" if preemption else "lost_workers"] += 1
        spot_workers = self.spot_workers(p)
        if w.state == 0:
            c["preempt_starting"] += 1
            del p.starting[w.id]
            self._bill(w, t)
        else:
            busy = self._remove_ready(p, w, t)
            if busy:
                # Its in-flight inputs go back to the queue at once; the work done on them is lost.
                lost_inputs = p.max_inputs
                p.acc = max(p.acc - lost_inputs * p.service_s * 0.5, 0.0)
                c["requeued"] += lost_inputs
                c["lost_cost"] += w.price * p.service_s * 0.5 / 3600.0
                self.by_kind[p.kind][4] += w.price * p.service_s * 0.5 / 3600.0
            self.tracker.requeue(p, w, t)
            w.state = 2
            w.end = t + (NOTICE_S.get(w.cloud, 30.0) if notice_s is None else notice_s)
            p.views[w.id] = WorkerView(w.id, "draining", w.launched, None, 0, w.price)
            p.draining.append(w)
        if preemption and w.market == SPOT:
            if self.policy.record_preemption(p.mstate, t, spot_workers, w.key):
                c["fallbacks"] += 1
            if self.policy.reclaimed(p.mstate, w.key, t):  # one offer's spot capacity is gone: fail over
                self.blocks.block(w.key, t + self.policy.settings.block_capacity_s, "spot capacity reclaimed")
        self.step(p, t)  # the reconciler is woken: the replacement starts now

    def on_burst(self, p: Pool, t: float) -> None:
        size = min(p.rng.lognormvariate(math.log(p.burst_median), BURST_SIGMA), BURST_MAX * p.burst_median)
        self.step(p, t, burst=max(int(size), 1))
        self._next_burst(p, t)

    def _next_burst(self, p: Pool, t: float) -> None:
        if p.burst_per_h <= 0:
            return
        peak = p.burst_per_h / 3600.0 * 1.6  # thinning: the diurnal factor below averages 0.65
        rng = p.rng
        while True:
            t += rng.expovariate(peak)
            if t >= self.horizon:
                return
            if rng.random() < 0.3 + 0.7 * 0.5 * (1.0 - math.cos(2 * math.pi * (t / DAY - p.phase))):
                self.push(t, BURST, p)
                return

    @staticmethod
    def poisson(rng: random.Random, m: float) -> int:
        if m <= 0.0:
            return 0
        if m > 40.0:
            return max(int(rng.gauss(m, math.sqrt(m)) + 0.5), 0)
        u = rng.random()
        pk = math.exp(-m)
        cum, k = pk, 0
        while u > cum and k < 200:
            k += 1
            pk *= m / k
            cum += pk
        return k

    def arrivals(self, p: Pool, t: float) -> int:
        """Online arrivals in [last call, ``t``). Counts are drawn per ``ARRIVAL_BIN_S`` bin from the pool's own
        RNG (so the input stream is the same whatever the policy does) and spread evenly over each bin."""
        end = min(t, self.horizon)
        n = 0
        rng, rate, poisson = p.rng, p.rate, self.poisson
        if p.bin_b < 0:
            p.bin_b, p.bin_taken = 0, 0
            p.bin_n = poisson(rng, rate(0.5 * ARRIVAL_BIN_S) * ARRIVAL_BIN_S)
        while True:
            b = p.bin_b
            b_end = (b + 1) * ARRIVAL_BIN_S
            if end >= b_end:
                n += p.bin_n - p.bin_taken
                if p.bin_n:
                    p.yard_bins.append((b, p.bin_n))  # a whole bin, for the optimum on the arrival stream
                p.bin_b = b + 1
                p.bin_n = poisson(rng, rate(b_end + 0.5 * ARRIVAL_BIN_S) * ARRIVAL_BIN_S)
                p.bin_taken = 0
                continue
            upto = int(p.bin_n * (end - b * ARRIVAL_BIN_S) / ARRIVAL_BIN_S)
            if upto > p.bin_taken:
                n += upto - p.bin_taken
                p.bin_taken = upto
            return n

    def step(self, p: Pool, t: float, burst: int = 0) -> None:
        c, hist = self.c, self.hists[p.kind]
        c["steps"] += 1
        t0 = p.t0
        L = t - t0
        s = p.service_s
        # 1. Serve [t0, t) as a fluid over the slot-seconds the ready workers had.
        served_from = -1  # the FIFO position of the first input started in the step (-1: none stepped)
        mu = 0.0
        if L > 0:
            dt = t - p.acc_t
            p.acc += p.slots * dt
            p.acc_ws += len(p.ready) * dt
            p.acc_cost += p.price_sum * dt
            arrivals = 0
            if p.peak_rate > 0.0 and t0 < self.horizon:
                arrivals = self.arrivals(p, t)
                c["inputs_in"] += arrivals
                if arrivals:
                    self.tracker.enter(p, arrivals, t0 + 0.5 * L / arrivals, L / arrivals)
            cap = p.acc / s + p.carry
            ncap = int(cap)
            total = p.queued + arrivals
            served = total if total < ncap else ncap
            p.carry = cap - ncap if served == ncap else 0.0
            x = r = 0
            work = 0.0
            served_from = p.started_seq
            p.started_seq += served
            if served:
                mu = cap / L  # inputs started per second, on average over the step
                q = p.queue
                while q and x < served:
                    coh = q[0]
                    a, n = coh
                    take = int(n) if n <= served - x else served - x
                    hist.add_ramp(t0 + x / mu - a, t0 + (x + take) / mu - a, take)
                    x += take
                    if take == n:
                        q.popleft()
                    else:
                        coh[1] = n - take
                p.queued -= x
                self.pending -= x
                r = served - x  # arrivals of this step served within it
                if r:
                    dt = L / arrivals
                    # arrival j comes at t0 + (j + .5)·dt and starts at t0 + (x + j)/mu, or on arrival
                    hist.add_ramp(x / mu - 0.5 * dt, (x + r) / mu - (r + 0.5) * dt, r)
                # busy worker-seconds: a worker serves max_inputs at once (as the optimum counts it)
                work = served * s / p.max_inputs
                c["work_s"] += work
                h = int(t0 // 3600.0)
                if h < len(self.busy_ws):
                    self.busy_ws[h] += work
                if p.acc_ws > 0:
                    paid = work * p.acc_cost / p.acc_ws / 3600.0
                    c["work_cost"] += paid
                    self.by_kind[p.kind][3] += paid
                    p.paid += paid
                c["inputs_out"] += served
                # What the control plane would measure from the results: every input here takes s.
                est = p.svc_est
                p.svc_est = s if est is None else est + SERVICE_EWMA * (s - est)
            # The feasible optimum by the run's own served profile (the other definition, on the arrival
            # stream, is advanced on its own fixed grid below): the work this run started, in target_inputs
            # workers, on the capacity the run had.
            self.yard_step(p, SERVED, t0, t, served * s / p.target, p.acc / p.target, total > 0)
            left = arrivals - r
            if left > 0:
                p.queue.append([t0 + L * (r + left / 2.0) / arrivals, left])
                p.queued += left
                self.pending += left
            busy = math.ceil(served * s / L) if L >= 1.0 else p.inflight
            p.inflight = busy
        p.t0 = t
        p.acc = p.acc_ws = p.acc_cost = 0.0
        p.acc_t = t
        self.advance_yard(p, t)
        if burst:
            self.tracker.enter(p, burst, t, 0.0)
            p.yards[ARRIVALS].pending += burst * p.service_s / p.max_inputs
            p.queue.append([t, burst])
            p.queued += burst
            self.pending += burst
            c["inputs_in"] += burst
        if p.queued > 0 or p.retry or p.inflight > p.slots:
            p.inflight = p.slots  # a backlog keeps every ready slot busy
        # 2. Which ready workers are busy: inputs go to the cheapest first, the oldest among equals.
        target = p.target
        m = min(-(-p.inflight // p.max_inputs), len(p.ready))
        ready = p.ready
        views = p.views
        if m > p.m:
            for k in range(p.m, m):
                w = ready[k]
                w.idle_since = None
                views[w.id] = WorkerView(w.id, "ready", w.launched, None, 1, w.price, w.floor)
        elif m < p.m:
            for k in range(m, p.m):
                w = ready[k]
                w.idle_since = t
                p.views[w.id] = WorkerView(w.id, "ready", w.launched, t, 0, w.price, w.floor)
        p.m = m
        if served_from >= 0:
            self.tracker.serve(p, t0, t, served_from, mu)
        if p.draining:
            keep = []
            for w in p.draining:
                if w.end <= t:
                    self._bill(w, w.end)
                else:
                    keep.append(w)
            p.draining = keep
        load = p.queued + p.inflight
        if load > 0:
            p.last_active = t
        # 3. The autoscaler's decision, applied (after the replacements are settled and the floor recomputed,
        # as at the start of the reconciler's ``_scale``).
        if p.replacing:
            self.settle(p, t)
        if p.min_od:
            self.refloor(p, t)
        seen = list(views.values())
        if p.launching:  # launches whose walk is on its way count as starting workers, as in ``_scale``
            seen += [WorkerView(f"launching-{i}", "starting", t) for i in range(p.launching)]
        snap = PoolSnapshot(
            backlog=p.queued + len(p.retry),
            in_flight=p.inflight,
            workers=seen,
            settings=p.settings,
            last_active_at=p.last_active,
            per_worker_target=target,
            service_time_s=None if self.no_estimates else p.svc_est,
            startup_s=None if self.no_estimates else p.boot_est,
        )
        d = self.autoscaler.decide(snap, t)
        c["decisions"] += 1
        for wid in d.terminate:
            gone = p.by_id.get(wid)
            if gone is not None:
                self.stop(p, gone, t)
        if d.launch > 0 and t >= p.launch_after:
            floor = (
                on_demand_launches(self.policy, p.min_od, self._od_workers(p), p.od_launching)
                if p.min_od
                else 0
            )
            self.launch(p, d.launch, t, on_demand=floor)
        elif p.spot == "allow" and not p.launching and (p.od_ready or p.od_starting()):
            self.move_back_to_spot(p, t)  # (a pool without on-demand workers has nothing to move)
        # 4. When to look again: a tick from now (two while nothing moves), or when an idle worker's
        # scaledown window ends, whichever is first.
        if (
            p.starting
            or ready
            or p.draining
            or p.queued
            or p.retry
            or p.launching
            or p.peak_rate > 0.0
            and t < self.horizon
        ):
            steady = not (d.launch or d.terminate or p.queued or p.starting or burst)
            nxt = t + (self.tick * 2.0 if steady else self.tick)
            window = p.settings.scaledown_window
            if p.m < len(ready):
                e = min(t if w.idle_since is None else w.idle_since for w in ready[p.m :]) + window
                if t < e < nxt:
                    nxt = e
            la = p.last_active
            if la is not None and t < la + window < nxt:
                nxt = la + window
            self.schedule_step(p, nxt if nxt > t + 1.0 else t + 1.0)
        else:
            p.token += 1  # asleep until the next burst

    # -- run ------------------------------------------------------------------------------------------------
    def warm_start(self, p: Pool) -> None:
        """The day begins in a running system: online pools start with the workers their load needs."""
        need = max(math.ceil(p.rate(0.0) * p.service_s / p.target), p.settings.min_containers)
        if p.settings.max_containers is not None:
            need = min(need, p.settings.max_containers)
        if need <= 0:
            return
        cands = self._rank(p, OD_MODE if p.spot == "never" else p.spot, 0.0)
        if not cands:
            return
        for _ in range(need):
            self._start_worker(p, cands[0], 0.0, None, ready_at=0.0)
        for w in list(p.starting.values()):
            self.on_ready(w, 0.0)
        p.last_active = 0.0
        for y in p.yards.values():  # the feasible optimum starts warm too: these layers need no start-up
            y.ends = [0.0] * need
            y.ends0 = [0.0] * need

    def run(self) -> dict[str, Any]:
        for p in self.pools:
            self.warm_start(p)
        for p in self.pools:
            if p.peak_rate > 0 or p.settings.min_containers:
                self.schedule_step(p, self.rng.uniform(0, self.tick))
            self._next_burst(p, 0.0)
        self.push(self.horizon, CUTOFF, None)
        self.scenarios.schedule(self)
        heap = self.heap
        pop = heapq.heappop
        end_limit = self.horizon + DRAIN_LIMIT_S
        t = 0.0
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        while heap:
            t, _, kind, obj, token = pop(heap)
            if t > end_limit:
                break
            if kind == STEP:
                if token == obj.token:
                    self.step(obj, t)
            elif kind == READY:
                self.on_ready(obj, t)
            elif kind == NOTICE:
                self.on_notice(obj, t)
            elif kind == BURST:
                self.on_burst(obj, t)
            elif kind == WALK:
                self.on_walk(obj, t)
            elif kind == SCENARIO:
                self.scenarios.fire(self, obj, t)
            else:  # CUTOFF: arrivals end; every pool accounts for its arrivals up to the horizon
                self.wall_at_horizon = time.perf_counter() - wall0
                self.arrivals_done = True
                for p in self.pools:
                    if p.t0 < self.horizon:
                        self.step(p, self.horizon)
            if self.arrivals_done and self.pending == 0 and self.tracker.retry_n == 0:
                break
        wall = time.perf_counter() - wall0
        self.cpu_s = time.process_time() - cpu0
        t_end = max(t, self.horizon)
        for p in self.pools:
            # The declared floor over the time after the pool's last step (no load there: min_containers only).
            idle = min(p.floor_min, p.floor_max)
            self.advance_yard(p, t_end)
            ya = p.yards[ARRIVALS]
            while ya.pending > 0 and ya.t < self.horizon + DRAIN_LIMIT_S:
                self.advance_yard(p, ya.t + ARRIVAL_BIN_S)
            if ya.t < t_end:  # the grid's last partial bin
                self.yard_step(p, ARRIVALS, ya.t, t_end, 0.0, 0.0, False)
                ya.t = t_end
            for d, y in p.yards.items():
                start = p.t0 if d == SERVED else y.t
                if idle > 0 and start < t_end:
                    self.opt_floor(p, d, start, t_end, idle)
                if y.pending > 0:  # work the optimum had not run by the end (counted busy, at the last price)
                    self._opt_add(p, d, "busy", y.pending * self.opt_price(p, p.t0) / 3600.0)
                    self.c["opt_unrun_ws"] += y.pending
                    y.pending = 0.0
            for w in list(p.starting.values()) + list(p.ready) + list(p.draining):
                self.tracker.complete(w)  # a live worker finishes what it holds
                self._bill(w, min(w.end, t_end) if w.state == 2 else t_end)
        return self.report(wall, t_end)

    def report(self, wall: float, t_end: float) -> dict[str, Any]:
        c = self.c
        left = sum(p.queued for p in self.pools)
        decisions = c["decisions"] + c["placements"]
        idle_cost = c["cost"] - c["work_cost"] - c["boot_cost"] - c["lost_cost"]
        hist = Hist.merged(self.hists.values())
        waits = sorted(self.walk_waits)

        def q(xs: list[float], x: float) -> float:
            return xs[min(int(x * len(xs)), len(xs) - 1)] if xs else 0.0

        def ratio(a: float, b: float) -> float:
            return a / b if b else math.inf

        optimum: dict[str, Any] = {}
        for d in DEFINITIONS:
            o = self.opt[d]
            parts = optimum_parts(o)
            kinds = {}
            for k, v in self.by_kind.items():
                pk = optimum_parts(self.opt_kind[d][k])
                kinds[k] = {
                    **pk,
                    "ratio": ratio(v[0], pk["optimum"]),
                    "ratio_no_floors": ratio(v[0], pk["optimum_no_floors"]),
                }
            optimum[d] = {
                **parts,
                "startups": o["startups"],
                "kept_idle": o["kept_idle"],
                "floors_idle": o["floors_idle"],
                "boots": int(round(o["boots"])),
                "startups_no_floors": o["startups0"],
                "kept_idle_no_floors": o["kept_idle0"],
                "boots_no_floors": int(round(o["boots0"])),
                "cost_ratio": ratio(c["cost"], parts["optimum"]),
                "cost_ratio_no_floors": ratio(c["cost"], parts["optimum_no_floors"]),
                "cost_ratio_lower_bound": ratio(c["cost"], parts["lower_bound"]),
                "by_kind": kinds,
            }
        return {
            "pools": self.args.pools,
            "hours": self.args.hours,
            "seed": self.args.seed,
            "tick_s": self.tick,
            "no_estimates": self.no_estimates,
            "bare_settings": self.bare,
            "launch_threads": int(getattr(self.args, "launch_threads", LAUNCH_THREADS)),
            "simulated_s": t_end,
            "wall_s": wall,
            "cpu_s": self.cpu_s,
            "speedup": t_end / wall if wall > 0 else math.inf,
            "wall_at_horizon_s": self.wall_at_horizon,
            "speedup_to_horizon": self.horizon / self.wall_at_horizon if self.wall_at_horizon else math.inf,
            "autoscaler_calls": int(c["decisions"]),
            "placement_calls": int(c["placements"]),
            "decisions_per_s": decisions / wall if wall > 0 else math.inf,
            "pool_steps": int(c["steps"]),
            "peak_workers": self.peak_live,
            "peak_hour_paid_workers": max(self.paid_ws) / 3600.0,
            "peak_hour_busy_workers": max(self.busy_ws) / 3600.0,
            "hourly_paid_workers": [round(x / 3600.0, 1) for x in self.paid_ws],
            "hourly_busy_workers": [round(x / 3600.0, 1) for x in self.busy_ws],
            "peak_at_h": self.peak_t / 3600.0,
            "launched": int(c["launched"]),
            "launched_spot": int(c["launched_spot"]),
            "walks": int(c["walks"]),
            "launch_tries": int(c["tries"]),
            "capacity_failures": int(c["cap_fail"]),
            "quota_failures": int(c["quota_fail"]),
            "class_blocks": int(c["class_blocks"]),
            "launches_exhausted": int(c["exhausted"]),
            "walk_queue_p50_s": q(waits, 0.5),
            "walk_queue_p99_s": q(waits, 0.99),
            "walk_queue_max_s": waits[-1] if waits else 0.0,
            "preemptions": int(c["preempted"]),
            "preempted_while_booting": int(c["preempt_starting"]),
            "workers_lost_with_region": int(c["lost_workers"]),
            "fallbacks": int(c["fallbacks"]),
            "restores": int(c["restores"]),
            "spot_probes": int(c["probes"]),
            "replaced_on_demand": int(c["replaced"]),
            "inputs_in": int(c["inputs_in"]),
            "inputs_out": int(c["inputs_out"]),
            "inputs_left": left,
            "inputs_requeued": int(c["requeued"]),
            **self.tracker.report(self.pools),
            "wait_p50_s": hist.quantile(0.50),
            "wait_p99_s": hist.quantile(0.99),
            "wait_mean_s": hist.sum / hist.total if hist.total else 0.0,
            "wait_max_s": hist.max,
            "cost": c["cost"],
            "optimum": optimum,
            "optimum_unrun_worker_s": c["opt_unrun_ws"],
            "cost_work": c["work_cost"],
            "cost_boot": c["boot_cost"],
            "cost_lost_work": c["lost_cost"],
            "cost_idle": idle_cost,
            "spot_share_worker_time": c["spot_worker_s"] / max(c["spot_worker_s"] + c["od_worker_s"], 1.0),
            "busy_worker_h": c["work_s"] / 3600.0,
            "paid_worker_h": (c["spot_worker_s"] + c["od_worker_s"]) / 3600.0,
            "by_kind": {
                k: {
                    "pools": sum(1 for p in self.pools if p.kind == k),
                    "cost": v[0],
                    "booting": v[2],
                    "busy": v[3],
                    "lost_work": v[4],
                    "idle": v[0] - v[2] - v[3] - v[4],
                    "wait_p50_s": self.hists[k].quantile(0.5),
                    "wait_p99_s": self.hists[k].quantile(0.99),
                    "inputs": self.hists[k].total,
                }
                for k, v in self.by_kind.items()
            },
            "scenarios": self.scenarios.report(),
            "by_group": self._groups(),
        }

    def _groups(self) -> dict[str, dict[str, float]]:
        """Cost and feasible optimum of pools grouped by what sets their overhead apart: whether they scale on
        a ``target_inputs`` below ``max_inputs`` (the autoscaler provisions for the target; the optimum on
        the arrival stream packs ``max_inputs``), and whether they declare floors."""
        out: dict[str, dict[str, float]] = {}
        for p in self.pools:
            if p.kind == "batch":
                g = "batch"
            else:
                g = (
                    "online, target_inputs < max_inputs"
                    if p.target < p.max_inputs
                    else "online, target = max"
                )
                g += ", with floors" if p.floor_min or p.floor_buf else ", no floors"
            x = out.setdefault(g, {"pools": 0, "cost": 0.0, **dict.fromkeys(DEFINITIONS, 0.0)})
            x["pools"] += 1
            x["cost"] += p.cost
            for d in DEFINITIONS:
                x[d] += p.optd[d]
        return dict(sorted(out.items()))


# --- output ------------------------------------------------------------------------------------------------


def _money(x: float) -> str:
    return f"${x:,.0f}"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min"


def render(r: dict[str, Any], width: int = 150) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=width)
    title = f"autoscale_sim: {r['pools']:,} pools, {r['hours']:g} h of load (seed {r['seed']}, tick {r['tick_s']:g} s)"
    if r.get("no_estimates"):
        title += "\nWHAT-IF: no service-time or start-up estimates (rule 1 asks for a slot per queued input)"
    if r.get("bare_settings"):
        title += "\nWHAT-IF: every pool with min_containers=0, buffer_containers=0, scaledown_window=60"
    if r.get("launch_threads") != LAUNCH_THREADS:
        title += f"\nWHAT-IF: {r['launch_threads']} launch threads (the reconciler has {LAUNCH_THREADS})"
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    t.add_column("met?", justify="center")

    def yes(ok: bool) -> str:
        return "yes" if ok else "[bold red]no[/]"

    t.add_row(
        "simulated time / wall time (CPU)",
        f"{r['simulated_s'] / 3600:.2f} h / {r['wall_s']:.1f} s ({r['cpu_s']:.1f} s)",
        "",
        "",
    )
    t.add_row(
        "speedup over real time: whole run / the load's hours",
        f"{r['speedup']:,.0f}× / {r['speedup_to_horizon']:,.0f}× ({r['hours']:g} h in {r['wall_at_horizon_s']:.1f} s);"
        f" per CPU second {r['simulated_s'] / max(r['cpu_s'], 1e-9):,.0f}×",
        "≥ 1,000×",
        yes(min(r["speedup"], r["speedup_to_horizon"]) >= 1000),
    )
    t.add_row(
        "decisions per wall second (autoscaler / placement calls)",
        f"{r['decisions_per_s']:,.0f} ({r['autoscaler_calls']:,} / {r['placement_calls']:,})",
        "",
        "",
    )
    t.add_row("peak live workers", f"{r['peak_workers']:,} (at {r['peak_at_h']:.1f} h)", "", "")
    t.add_row(
        "peak hour: workers paid / busy (average)",
        f"{r['peak_hour_paid_workers']:,.0f} / {r['peak_hour_busy_workers']:,.0f}",
        "",
        "",
    )
    t.add_row("workers launched (spot)", f"{r['launched']:,} ({r['launched_spot']:,})", "", "")
    t.add_row(
        "walks / launch calls; failures capacity / quota; classes blocked",
        f"{r['walks']:,} / {r['launch_tries']:,}; {r['capacity_failures']:,} / {r['quota_failures']:,};"
        f" {r['class_blocks']:,}",
        "",
        "",
    )
    t.add_row("walks that started nothing (exhausted)", f"{r['launches_exhausted']:,}", "", "")
    t.add_row(
        f"wait for one of the {r['launch_threads']} launch threads: p50 / p99 / max",
        f"{_s(r['walk_queue_p50_s'])} / {_s(r['walk_queue_p99_s'])} / {_s(r['walk_queue_max_s'])}",
        "",
        "",
    )
    t.add_row(
        "preemptions (while booting); workers lost with a region",
        f"{r['preemptions']:,} ({r['preempted_while_booting']:,}); {r['workers_lost_with_region']:,}",
        "",
        "",
    )
    t.add_row(
        "spot fallbacks / restores / probes / on-demand replaced",
        f"{r['fallbacks']:,} / {r['restores']:,} / {r['spot_probes']:,} / {r['replaced_on_demand']:,}",
        "",
        "",
    )
    t.add_row(
        "inputs in / results out / left unserved (fluid counts)",
        f"{r['inputs_in']:,} / {r['inputs_out']:,} / {r['inputs_left']:,}",
        "",
        "",
    )
    t.add_row(
        "tracked inputs: results exactly once / none / more than once",
        f"{r['tracked_once']:,} of {r['tracked']:,} / {r['tracked_no_result']:,} / {r['tracked_more_than_once']:,}",
        "all once",
        yes(r["tracked_once"] == r["tracked"]),
    )
    t.add_row(
        "tracked inputs requeued by a preemption (ran again); their wait p50 / p99",
        f"{r['tracked_requeued']:,}; {r['tracked_wait_p50_s']:.2f} s / {r['tracked_wait_p99_s']:.1f} s",
        "",
        "",
    )
    t.add_row(
        "input wait p50 / p99 (mean, max)",
        f"{r['wait_p50_s']:.2f} s / {r['wait_p99_s']:.1f} s ({r['wait_mean_s']:.1f} s, {r['wait_max_s']:.0f} s)",
        "",
        "",
    )
    for kind, k in r["by_kind"].items():
        t.add_row(
            f"  {kind} pools ({k['pools']}): wait p50 / p99",
            f"{k['wait_p50_s']:.2f} s / {k['wait_p99_s']:.1f} s",
            "",
            "",
        )
    t.add_row("cost (cloudmodal)", _money(r["cost"]), "", "")
    t.add_row(
        "  busy (max_inputs per worker) / booting / idle / lost work",
        f"{_money(r['cost_work'])} / {_money(r['cost_boot'])} / {_money(r['cost_idle'])} / {_money(r['cost_lost_work'])}",
        "",
        "",
    )
    t.add_row(
        "  worker-hours paid / busy; spot share",
        f"{r['paid_worker_h']:,.0f} / {r['busy_worker_h']:,.0f}; {r['spot_share_worker_time'] * 100:.0f}%",
        "",
        "",
    )
    con.print(t)

    o = Table(title="cost against the feasible offline optimum, two definitions (waits: the run's, above)")
    o.add_column("")
    names = {
        ARRIVALS: "arrival stream, max_inputs per worker (the yardstick)",
        SERVED: "the run's served profile, target_inputs per worker",
    }
    for d in DEFINITIONS:
        o.add_column(names[d], justify="right")
    opt = r["optimum"]

    def row(label: str, f: Any) -> None:
        o.add_row(label, *[f(opt[d]) for d in DEFINITIONS])

    row(
        "optimum = busy + start-ups + kept idle + floors idle",
        lambda x: (
            f"{_money(x['optimum'])} = {_money(x['lower_bound'])} + {_money(x['startups'])} + "
            f"{_money(x['kept_idle'])} + {_money(x['floors_idle'])} ({x['boots']:,} boots)"
        ),
    )
    row(
        "cost / optimum (goal ≤ 1.10)",
        lambda x: f"{x['cost_ratio']:.3f}" + ("" if x["cost_ratio"] <= 1.10 else " [bold red](over)[/]"),
    )
    for kind in r["by_kind"]:
        row(f"  {kind} pools: cost / optimum", lambda x, k=kind: f"{x['by_kind'][k]['ratio']:.3f}")
    row(
        "cost / optimum without the declared floors",
        lambda x: f"{x['cost_ratio_no_floors']:.3f} ({_money(x['optimum_no_floors'])})",
    )
    row("cost / lower bound (busy only)", lambda x: f"{x['cost_ratio_lower_bound']:.3f}")
    for g, x in r.get("by_group", {}).items():
        o.add_row(
            f"  {g} ({x['pools']}): cost / optimum",
            *[
                f"{x['cost'] / x[d]:.3f} ({_money(x['cost'])} / {_money(x[d])})" if x[d] else "-"
                for d in DEFINITIONS
            ],
        )
    con.print(o)

    if r.get("scenarios"):
        sc = Table(
            title="correlated outages: time from the outage to each hit pool's first worker on the next tier"
        )
        for col in (
            "scenario",
            "from",
            "hours",
            "pools hit",
            "asked",
            "moved",
            "from the outage: p50 / p90 / max",
            "from the pool's first launch: p50 / p90 / max",
        ):
            sc.add_column(col, justify="left" if col == "scenario" else "right")
        for x in r["scenarios"]:
            sc.add_row(
                x["scenario"],
                f"{x['start_h']:.1f} h",
                f"{x['hours']:.2g}",
                f"{x['pools_hit']}",
                f"{x['pools_asked']}",
                f"{x['pools_moved']}",
                f"{_s(x['next_tier_p50_s'])} / {_s(x['next_tier_p90_s'])} / {_s(x['next_tier_max_s'])}",
                f"{_s(x['after_ask_p50_s'])} / {_s(x['after_ask_p90_s'])} / {_s(x['after_ask_max_s'])}",
            )
        con.print(sc)


def default_catalog_dir() -> Path:
    """``CLOUDMODAL_CATALOG_DIR``, else the shared snapshot beside the repository (``../shared``)."""
    return Path(
        os.environ.get("CLOUDMODAL_CATALOG_DIR") or REPO.parent / "shared" / "pricing" / "catalogs" / "v8"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--quick", action="store_true", help="100 pools, 2 h of load (seconds)")
    ap.add_argument(
        "--scenarios",
        action="store_true",
        help="add the correlated outages (a GPU type out everywhere 1 h and 6 h, a region down, a spot wave)",
    )
    ap.add_argument(
        "--track-every", type=int, default=TRACK_EVERY, help="track one input in this many individually"
    )
    ap.add_argument(
        "--launch-threads",
        type=int,
        default=LAUNCH_THREADS,
        help="walks at once over all pools (the reconciler's launch executor)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--tick", type=float, default=30.0, help="seconds between a pool's steps (events step at once)"
    )
    ap.add_argument(
        "--no-estimates",
        action="store_true",
        help="what-if: pass the autoscaler no service-time or start-up estimate (a slot per queued input)",
    )
    ap.add_argument(
        "--bare-settings",
        action="store_true",
        help="what-if: every pool with min_containers=0, buffer_containers=0, scaledown_window=60",
    )
    ap.add_argument("--catalog-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    args = ap.parse_args(argv)
    if args.quick:
        args.pools, args.hours = 100, 2.0
    args.catalog_dir = args.catalog_dir or default_catalog_dir()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sim = Sim(args)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        r = sim.run()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        r = sim.run()
    render(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
