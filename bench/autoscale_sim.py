"""Autoscaling at fleet scale, by simulation: the real autoscaler, placement and spot policy on simulated time.

Drives cloudmodal's own decision code — ``Autoscaler.decide`` (``cloudmodal/server/autoscaler.py``),
``rank`` (``cloudmodal/placement.py``) over the shared price catalog, and ``MarketPolicy`` / ``BlockList``
(``cloudmodal/server/spot.py``) — through a day of bursty load on many pools. No worker processes, no HTTP,
no database: the cloud, the workers and the inputs are simulated, and time is an event queue.

What is simulated (see bench/README.md for the numbers and the definitions):

- **Pools** with a GPU fallback list drawn from realistic types in the catalog, a spot setting, autoscaler
  settings, a per-worker concurrency and a service time per input. Online pools get a diurnal Poisson stream
  with spikes; batch pools get ``.map()`` bursts of thousands of inputs.
- **Inputs** are counts in a FIFO queue of arrival cohorts per pool. Each pool steps every ``--tick`` seconds
  (and at once on a burst or a preemption notice); a step serves, as a fluid, what the slot-seconds of its
  ready workers allow, and records each served input's wait (start − arrival) in a histogram.
- **Workers** boot (a provisioning delay per cloud plus the pool's start-up), run, are stopped by the
  autoscaler, or are preempted: a spot worker gets a notice, drains (its in-flight inputs go back to the
  queue at once, their partial work lost) and is billed until the notice ends. Preemptions come from a
  background rate per cloud and GPU and from reclaim waves when the offer's spot capacity runs out.
- **The cloud**: every (offer, market) goes in and out of stock (alternating exponential periods, shorter and
  rarer for scarce GPUs and for spot); a launch on an offer out of stock is a capacity failure, on a
  (cloud, GPU, market) without quota a quota failure; both are blocked through ``BlockList`` and the next
  candidate is tried, as the reconciler does.
- **What the autoscaler is told**: the estimates the reconciler passes it — the pool's service time (an
  EWMA over the steps that served inputs; None before the first result) and its start-up (the median launch →
  ready of its 16 most recent workers; None before the first boot). ``--no-estimates`` passes neither (rule 1
  then asks for a slot per queued input, as before service-time-aware scaling).
- **Cost** = $/h fixed at launch × time alive (booting included). Two offline references:

  - the **lower bound**: the busy worker-time the inputs needed (inputs × service time ÷ ``target_inputs``),
    each second priced at p*(t), the $/h of the pool's cheapest feasible offer at that moment (placement's
    order over the offers in stock with quota), with no start-up, idle or lost time — no scheduler can reach it, since every worker
    boots;
  - the **feasible optimum** (the goal's yardstick): the lower bound, plus the idle workers the pool's own
    declared floors require, plus the start-ups a scheduler that knows the future must still pay. It honours
    each pool's declared ``min_containers`` m and ``buffer_containers`` b, because the user asked for those
    workers and every schedule that honours the settings pays for them, the optimum included (before, it
    ignored them, which charged the settings' cost to the autoscaler). Per pool and step [t0, t1):

    - the busy profile n: the worker-seconds run in the step ÷ (t1 − t0), in ``target_inputs`` workers (the
      work started, run on the capacity the step had, carried into later steps where it exceeds it);
    - the profile f = max(n, min(max(n + b·active, m), max_containers)), the settings read as the autoscaler
      reads them (rules 2–3: ``desired = clamp(needed + buffer, min, max)``): m workers at all times, b idle
      workers beyond the load while the pool is *active* — work queued or running in the step (the
      autoscaler's ``load > 0``; the ``scaledown_window`` tail after the load is a policy, not a
      requirement, so it is not in f) — the m floor workers counting towards them, and ``max_containers``
      wins. The floors' idle part, (f − n) × ∫ p*
      dt over the step, is added (the busy part n is already in the lower bound). A sleeping pool's time is
      inside the step that wakes it (n = 0 there), and the time after a pool's last step until the end of
      the run counts m idle workers; so m is paid over the whole run;
    - start-ups: f is cut into layers k = 1, 2, … (layer k is present in a step while f > k − 1). Each layer
      pays one start-up when it first appears, and for every later gap the cheaper of a new start-up and
      keeping its worker idle through the gap: min(gap, boot) × $/h (ski rental with a known future: gaps
      shorter than a boot are merged). The first m layers are always present: a floor worker never re-boots.
      boot = the median provisioning delay of the cloud of the cheapest feasible offer at that moment (+60 s
      for 8-GPU nodes) + the pool's start-up; $/h = that offer's. Layers running at 00:00 start warm, as the
      simulated pools do.

    Also reported: the **feasible optimum without the declared floors** (the previous definition): the same
    layering over n alone, with no floors' idle part.

Run: ``.venv/bin/python bench/autoscale_sim.py`` (1,000 pools, 24 h); ``--pools 100 --hours 2`` for a quick run.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cloudmodal.gpu import parse_gpu  # noqa: E402
from cloudmodal.placement import Candidate, PlacementPolicy, rank  # noqa: E402
from cloudmodal.pricing.catalog import load_offer_table  # noqa: E402
from cloudmodal.pricing.offers import Offer, OfferKey, OfferTable  # noqa: E402
from cloudmodal.server.autoscaler import Autoscaler, PoolSnapshot, WorkerView  # noqa: E402
from cloudmodal.server.spot import BlockList, MarketPolicy, MarketSettings, PoolMarketState  # noqa: E402
from cloudmodal.spec import AutoscalerSettings  # noqa: E402

DAY = 86_400.0
BOOT_SAMPLES = 16  # the start-up estimate is the median of this many recent boots, as the reconciler's
SERVICE_EWMA = 0.2  # weight of a step's mean service time in the service-time estimate
SPOT, OD = "spot", "on-demand"
OD_MODE = "never"  # PlacementPolicy(spot=...) for on-demand only
MAX_LAUNCH_TRIES = 12  # as the reconciler: candidates tried per worker before backing off
LAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
CANDIDATES = 16  # placement limit per ranking

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

    def stock_of(self, key: OfferKey) -> Stock:
        s = self.stock.get(key)
        if s is None:
            up_h, down_min = STOCK[(key.market, scarcity(key.gpu, key.gpu_count))]
            s = self.stock[key] = Stock(zlib.crc32(str(key).encode()) ^ self.seed, up_h, down_min)
        return s

    def offers_of(self, gpu: str) -> tuple[Offer, ...]:
        got = self.gpu_offers.get(gpu)
        if got is None:
            got = self.gpu_offers[gpu] = self.table.for_gpu(gpu)
        return got


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
        "replaces",
        "end",
        "floor",
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
        self.replaces: str | None = None
        self.end = math.inf
        self.floor = False  # one of the pool's min_on_demand on-demand workers (see Sim._refloor)


def _dispatch_key(w: Worker) -> tuple[float, float]:
    """Inputs go to the cheapest first, the oldest among equals; the on-demand floor counts as free (it is
    paid for whether it works or not), as in the control plane's hand-off."""
    return (0.0 if w.floor else w.price, w.launched)


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
        "opt_pending",
        "opt_layers",
        "layer_end",
        "opt_layers0",
        "layer_end0",
        "floor_min",
        "floor_buf",
        "floor_max",
        "svc_est",
        "boots",
        "boot_est",
        "spot_price",
        "cost",
        "opt",
        "paid",
        "rng",
        "bin_b",
        "bin_n",
        "bin_taken",
    )

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
        self.opt_pending = 0.0  # worker-seconds started but not yet executed (the feasible optimum's profile)
        self.opt_layers = 0  # layers of the feasible optimum's profile present in the last step
        self.layer_end: list[float] = []  # per layer: when it was last present (its gap starts there)
        self.opt_layers0 = 0  # the same, for the profile without the declared floors (the busy profile alone)
        self.layer_end0: list[float] = []
        self.floor_min = self.floor_buf = (
            0  # the declared min_containers, buffer_containers (set in _init_opt)
        )
        self.floor_max = math.inf  # max_containers (the cap wins, as in the autoscaler)
        self.svc_est: float | None = None  # what the autoscaler is told: mean service time of served inputs
        self.boots: deque[float] = deque(maxlen=BOOT_SAMPLES)  # launch → ready of recent workers
        self.boot_est: float | None = None  # their median
        self.spot_price = (-math.inf, None)  # (when ranked, best spot $/h)
        self.cost = self.opt = self.paid = 0.0  # $: billed, optimum, busy time at the price paid
        self.rng = random.Random(i)  # this pool's inputs (reseeded by make_pools)
        self.bin_b = -1  # the arrival bin being consumed, its count, and how many of it have arrived
        self.bin_n = self.bin_taken = 0
        self.spikes: list[tuple[float, float, float]] = []

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


# --- the simulation ----------------------------------------------------------------------------------------

STEP, READY, NOTICE, BURST, CUTOFF = 0, 1, 2, 3, 4


class Sim:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.table = load_offer_table(args.catalog_dir)
        self.cloud = Cloud(self.table, args.seed)
        self.autoscaler = Autoscaler()
        self.policy = MarketPolicy(MarketSettings())
        self.blocks = BlockList()
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
                "preempted",
                "preempt_starting",
                "requeued",
                "fallbacks",
                "restores",
                "replaced",
                "steps",
                "cost",
                "boot_cost",
                "lost_cost",
                "work_cost",
                "opt_cost",
                "opt_boot_cost",
                "opt_gap_cost",
                "opt_boots",
                "opt_floor_cost",
                "opt0_boot_cost",
                "opt0_gap_cost",
                "opt0_boots",
                "work_s",
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
        self.by_kind = {"online": [0.0] * 8, "batch": [0.0] * 8}
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
        stock_of = self.cloud.stock_of
        chosen = (p.opt_cands[0][0], p.opt_cands[0][2]) if p.opt_cands else (0.0, 0.0)
        for price, key, boot in p.opt_cands:
            s = stock_of(key)
            nf = s.next_flip(t)
            if nf < until:
                until = nf
            if s.up(t):
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

    def opt_floor(self, p: Pool, a: float, b: float, idle: float) -> None:
        """The declared floors' idle part of the feasible optimum: ``idle`` workers over [a, b) at p*."""
        cost = idle * self.opt_price_s(p, a, b) / 3600.0
        self.c["opt_floor_cost"] += cost
        self.by_kind[p.kind][6] += cost

    def opt_layers(self, p: Pool, t0: float, n: float, floors: bool = True, both: bool = False) -> None:
        """The feasible optimum's start-ups: the profile ``n`` (workers) of the step beginning at ``t0``, as
        layers k = 1, 2, … (layer k is present while n > k − 1). A layer that appears pays one start-up at
        the cheapest feasible offer, or, if it was present before, the cheaper of a start-up and keeping its
        worker idle through the gap: min(gap, boot) × $/h (ski rental, with the future known).

        ``floors``: the profile with the pool's declared floors (the feasible optimum), else the busy profile
        alone (the optimum without the floors). ``both``: the two profiles are the same (a pool without
        floors), so the start-ups are counted for both from the first one's layers."""
        c = math.ceil(n - 1e-9) if n > 1e-9 else 0
        prev = p.opt_layers if floors else p.opt_layers0
        if c == prev:
            return
        ends = p.layer_end if floors else p.layer_end0
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
            cc, kind = self.c, self.by_kind[p.kind]
            extra = (boot_s + gap_s) * price / 3600.0
            if floors:
                cc["opt_boot_cost"] += boot_s * price / 3600.0
                cc["opt_gap_cost"] += gap_s * price / 3600.0
                cc["opt_boots"] += boots
                kind[5] += extra
            if both or not floors:
                cc["opt0_boot_cost"] += boot_s * price / 3600.0
                cc["opt0_gap_cost"] += gap_s * price / 3600.0
                cc["opt0_boots"] += boots
                kind[7] += extra
        if floors:
            p.opt_layers = c
        else:
            p.opt_layers0 = c

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
            self._refloor(p, t)
        return busy

    def _refloor(self, p: Pool, t: float) -> None:
        """A floor worker left: the next cheapest ready on-demand worker joins the floor (the reconciler
        recomputes the floor each tick), and the ready list is re-sorted with the busy set following it."""
        od = sorted(
            (x for x in p.ready if x.market == OD and not x.floor), key=lambda x: (x.price, x.launched)
        )
        need = p.min_od - sum(x.floor for x in p.ready)
        if need <= 0 or not od:
            return
        for x in od[:need]:
            x.floor = True
        busy = set(map(id, p.ready[: p.m]))
        p.ready.sort(key=_dispatch_key)
        for k, x in enumerate(p.ready):
            now_busy = k < p.m
            if now_busy == (id(x) in busy) and not x.floor:
                continue
            x.idle_since = None if now_busy else (x.idle_since if id(x) not in busy else t)
            p.views[x.id] = WorkerView(
                x.id, "ready", x.launched, x.idle_since, 1 if now_busy else 0, x.price, x.floor
            )

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
            self._bill(w, t + extra)

    def launch(
        self, p: Pool, n: int, t: float, *, force: str | None = None, replaces: str | None = None
    ) -> int:
        """Start ``n`` workers as the reconciler does: placement's candidates in order, failing over on
        capacity and quota errors (each blocks what it rules out), with the spot policy choosing the market."""
        if n <= 0 or t < p.launch_after:
            return 0
        policy, c = self.policy, self.c
        floor = 0
        if force is None and p.min_od:
            live_od = sum(1 for w in p.ready if w.market == OD) + sum(
                1 for w in p.starting.values() if w.market == OD
            )
            floor = policy.on_demand_floor(p.min_od, live_od)
        lists: dict[str, list[Candidate]] = {}
        ptr: dict[str, int] = {}
        started = 0
        for _ in range(n):
            if force is not None:
                mode = force
            elif floor > 0:
                mode = OD_MODE
                floor -= 1
            else:
                mode = policy.spot_mode(p.spot, p.mstate, t)  # type: ignore[arg-type]
            tries = 0
            ok = False
            reranked = False
            while tries < MAX_LAUNCH_TRIES:
                cands = lists.get(mode)
                if cands is None:
                    cands = lists[mode] = self._rank(p, mode, t)
                    ptr[mode] = 0
                i = ptr[mode]
                if i >= len(cands):
                    if reranked or not cands:
                        break
                    lists.pop(mode)
                    reranked = True
                    continue
                cand = cands[i]
                key = cand.key
                until = self.blocks.until(key)
                if until is not None and until > t:
                    ptr[mode] = i + 1
                    continue
                tries += 1
                quota = (key.cloud, key.gpu, key.market) in self.cloud.no_quota
                if quota or not self.cloud.stock_of(key).up(t):
                    c["quota_fail" if quota else "cap_fail"] += 1
                    why = "QuotaExceededError" if quota else "NoCapacityError"
                    policy.block_failed_launch(
                        self.blocks,
                        key,
                        t,
                        why,
                        quota=quota,
                        offers=self.cloud.offers_of(key.gpu) if quota else (),
                    )
                    ptr[mode] = i + 1
                    if cand.market == SPOT and policy.record_spot_failure(p.mstate, t):
                        c["fallbacks"] += 1
                        if force is None and mode == "allow" and p.spot == "allow":
                            mode = policy.spot_mode(p.spot, p.mstate, t)  # type: ignore[arg-type]
                    continue
                self._start_worker(p, cand, t, replaces)
                if cand.market == SPOT and policy.record_spot_success(p.mstate, t):
                    c["restores"] += 1
                ok = True
                break
            if not ok:
                c["exhausted"] += 1
                p.launch_fails += 1
                p.launch_after = t + LAUNCH_BACKOFF_S[min(p.launch_fails - 1, len(LAUNCH_BACKOFF_S) - 1)]
                break
            p.launch_fails = 0
            started += 1
        return started

    def _rank(self, p: Pool, mode: str, t: float) -> list[Candidate]:
        self.c["placements"] += 1
        got = rank(
            p.tiers, self.table, policy=self._policy(p, mode), blocked=self.blocks.active(t), limit=CANDIDATES
        )
        return list(got.candidates)

    def _start_worker(
        self, p: Pool, cand: Candidate, t: float, replaces: str | None, ready_at: float | None = None
    ) -> None:
        rng, c = self.rng, self.c
        o = cand.offer
        if ready_at is None:
            boot = BOOT_MEDIAN_S.get(o.cloud, 120.0) * rng.lognormvariate(0.0, 0.35)
            if o.gpu_count >= 8:
                boot += 60.0
            ready_at = t + boot + p.startup_s
        self.wseq += 1
        w = Worker(f"w{self.wseq}", p, cand, t, ready_at)
        w.replaces = replaces
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

    def on_ready(self, w: Worker, t: float) -> None:
        if w.state != 0:
            return
        p = w.pool
        del p.starting[w.id]
        self._acc(p, t)
        w.state = 1
        w.idle_since = t
        if t > w.launched:  # not a warm-start worker: its boot is a sample of the pool's start-up
            p.boots.append(t - w.launched)
            p.boot_est = sorted(p.boots)[len(p.boots) // 2]
        # Inputs go to the cheapest ready workers first (the control plane hands an input to the cheapest
        # parked worker), the oldest among equals: the ready list is kept in that order.
        if p.min_od and w.market == OD and sum(x.floor for x in p.ready) < p.min_od:
            w.floor = True
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
        if w.replaces is not None:
            old = p.by_id.get(w.replaces)
            if old is not None and old.state in (0, 1):
                self.stop(p, old, t, finish=True)
                self.c["replaced"] += 1

    def on_notice(self, w: Worker, t: float) -> None:
        if w.state not in (0, 1):
            return
        p = w.pool
        c = self.c
        c["preempted"] += 1
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
            w.state = 2
            w.end = t + NOTICE_S.get(w.cloud, 30.0)
            p.views[w.id] = WorkerView(w.id, "draining", w.launched, None, 0, w.price)
            p.draining.append(w)
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
        if L > 0:
            dt = t - p.acc_t
            p.acc += p.slots * dt
            p.acc_ws += len(p.ready) * dt
            p.acc_cost += p.price_sum * dt
            arrivals = 0
            if p.peak_rate > 0.0 and t0 < self.horizon:
                arrivals = self.arrivals(p, t)
                c["inputs_in"] += arrivals
            cap = p.acc / s + p.carry
            ncap = int(cap)
            total = p.queued + arrivals
            served = total if total < ncap else ncap
            p.carry = cap - ncap if served == ncap else 0.0
            x = r = 0
            work = 0.0
            if served:
                mu = cap / L  # inputs started per second, on average over the step
                q = p.queue
                while q and x < served:
                    coh = q[0]
                    a, n = coh
                    take = n if n <= served - x else served - x
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
                work = served * s / p.target
                c["work_s"] += work
                h = int(t0 // 3600.0)
                if h < len(self.busy_ws):
                    self.busy_ws[h] += work
                opt = work * self.opt_price(p, 0.5 * (t0 + t)) / 3600.0
                c["opt_cost"] += opt
                self.by_kind[p.kind][1] += opt
                p.opt += opt
                if p.acc_ws > 0:
                    paid = work * p.acc_cost / p.acc_ws / 3600.0
                    c["work_cost"] += paid
                    self.by_kind[p.kind][3] += paid
                    p.paid += paid
                c["inputs_out"] += served
                # What the control plane would measure from the results: every input here takes s.
                est = p.svc_est
                p.svc_est = s if est is None else est + SERVICE_EWMA * (s - est)
            # The busy profile of the feasible optimum: work runs when started, on the capacity there was.
            pending = p.opt_pending + work
            done = p.acc / p.target
            if done > pending:
                done = pending
            p.opt_pending = pending - done
            n = done / L
            lo, buf = p.floor_min, p.floor_buf
            if lo or buf:
                # The declared floors: min_containers at all times; buffer_containers beyond the load while
                # there is work (queued or running) in the step; max_containers wins, as in the autoscaler.
                want = n + buf if total > 0 or pending > 0 else 0.0
                f = min(want if want > lo else lo, p.floor_max)
                if f > n:
                    self.opt_floor(p, t0, t, f - n)
                else:
                    f = n
                self.opt_layers(p, t0, f)
                self.opt_layers(p, t0, n, floors=False)
            else:
                self.opt_layers(p, t0, n, both=True)
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
        if burst:
            p.queue.append([t, burst])
            p.queued += burst
            self.pending += burst
            c["inputs_in"] += burst
        if p.queued > 0 or p.inflight > p.slots:
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
        # 3. The autoscaler's decision, applied.
        views = list(views.values())
        snap = PoolSnapshot(
            backlog=p.queued,
            in_flight=p.inflight,
            workers=views,
            settings=p.settings,
            last_active_at=p.last_active,
            per_worker_target=target,
            service_time_s=None if self.no_estimates else p.svc_est,
            startup_s=None if self.no_estimates else p.boot_est,
        )
        d = self.autoscaler.decide(snap, t)
        c["decisions"] += 1
        for wid in d.terminate:
            w = p.by_id.get(wid)
            if w is not None:
                self.stop(p, w, t)
        if d.launch:
            self.launch(p, d.launch, t)
        elif p.od_ready > p.min_od and p.spot == "allow" and p.mstate.fallback_since is None:
            self.maybe_replace(p, t)
        # 4. When to look again: a tick from now (two while nothing moves), or when an idle worker's
        # scaledown window ends, whichever is first.
        if p.starting or ready or p.draining or p.queued or p.peak_rate > 0.0 and t < self.horizon:
            steady = not (d.launch or d.terminate or p.queued or p.starting or burst)
            nxt = t + (self.tick * 2.0 if steady else self.tick)
            window = p.settings.scaledown_window
            if p.m < len(ready):
                e = min([w.idle_since for w in ready[p.m :]]) + window  # type: ignore[type-var]
                if t < e < nxt:
                    nxt = e
            la = p.last_active
            if la is not None and t < la + window < nxt:
                nxt = la + window
            self.schedule_step(p, nxt if nxt > t + 1.0 else t + 1.0)
        else:
            p.token += 1  # asleep until the next burst

    def maybe_replace(self, p: Pool, t: float) -> None:
        """After a fallback, move on-demand workers above the floor back to spot, one at a time."""
        pending = {w.replaces for w in p.starting.values() if w.replaces is not None}
        od = [(w.id, w.market, w.price) for w in p.ready if w.market == OD and w.id not in pending]
        if len(od) + len(pending) <= p.min_od:
            return
        when, price = p.spot_price
        if t - when >= 60.0:
            got = self._rank(p, "require", t)
            price = got[0].price if got else None
            p.spot_price = (t, price)
        ids = self.policy.to_replace(p.mstate, od, p.min_od, price, t)
        for wid in ids:
            self.launch(p, 1, t, force="require", replaces=wid)

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
        p.layer_end = [0.0] * need  # the feasible optimum starts warm too: these layers need no start-up
        p.layer_end0 = [0.0] * need

    def run(self) -> dict[str, Any]:
        for p in self.pools:
            self.warm_start(p)
        for p in self.pools:
            if p.peak_rate > 0 or p.settings.min_containers:
                self.schedule_step(p, self.rng.uniform(0, self.tick))
            self._next_burst(p, 0.0)
        self.push(self.horizon, CUTOFF, None)
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
            else:  # CUTOFF: arrivals end; every pool accounts for its arrivals up to the horizon
                self.wall_at_horizon = time.perf_counter() - wall0
                self.arrivals_done = True
                for p in self.pools:
                    if p.t0 < self.horizon:
                        self.step(p, self.horizon)
            if self.arrivals_done and self.pending == 0:
                break
        wall = time.perf_counter() - wall0
        self.cpu_s = time.process_time() - cpu0
        t_end = max(t, self.horizon)
        for p in self.pools:
            # The declared floor over the time after the pool's last step (no load there: min_containers only).
            idle = min(p.floor_min, p.floor_max)
            if idle > 0 and p.t0 < t_end:
                self.opt_floor(p, p.t0, t_end, idle)
            for w in list(p.starting.values()) + list(p.ready) + list(p.draining):
                self._bill(w, min(w.end, t_end) if w.state == 2 else t_end)
        return self.report(wall, t_end)

    def report(self, wall: float, t_end: float) -> dict[str, Any]:
        c = self.c
        left = sum(p.queued for p in self.pools)
        lost = int(c["inputs_in"] - c["inputs_out"] - left)
        decisions = c["decisions"] + c["placements"]
        idle_cost = c["cost"] - c["work_cost"] - c["boot_cost"] - c["lost_cost"]
        feasible = c["opt_cost"] + c["opt_boot_cost"] + c["opt_gap_cost"] + c["opt_floor_cost"]
        no_floors = c["opt_cost"] + c["opt0_boot_cost"] + c["opt0_gap_cost"]
        hist = Hist.merged(self.hists.values())
        return {
            "pools": self.args.pools,
            "hours": self.args.hours,
            "seed": self.args.seed,
            "tick_s": self.tick,
            "no_estimates": self.no_estimates,
            "bare_settings": self.bare,
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
            "results_with_a_wait_recorded": int(round(hist.total)),
            "peak_at_h": self.peak_t / 3600.0,
            "launched": int(c["launched"]),
            "launched_spot": int(c["launched_spot"]),
            "capacity_failures": int(c["cap_fail"]),
            "quota_failures": int(c["quota_fail"]),
            "launches_exhausted": int(c["exhausted"]),
            "preemptions": int(c["preempted"]),
            "preempted_while_booting": int(c["preempt_starting"]),
            "fallbacks": int(c["fallbacks"]),
            "restores": int(c["restores"]),
            "replaced_on_demand": int(c["replaced"]),
            "inputs_in": int(c["inputs_in"]),
            "inputs_out": int(c["inputs_out"]),
            "inputs_left": left,
            "inputs_lost": lost,
            "inputs_requeued": int(c["requeued"]),
            "wait_p50_s": hist.quantile(0.50),
            "wait_p99_s": hist.quantile(0.99),
            "wait_mean_s": hist.sum / hist.total if hist.total else 0.0,
            "wait_max_s": hist.max,
            "cost": c["cost"],
            "lower_bound": c["opt_cost"],
            "optimum": feasible,
            "optimum_startups": c["opt_boot_cost"],
            "optimum_kept_idle": c["opt_gap_cost"],
            "optimum_boots": int(round(c["opt_boots"])),
            "optimum_floors_idle": c["opt_floor_cost"],
            "optimum_no_floors": no_floors,
            "optimum_no_floors_startups": c["opt0_boot_cost"],
            "optimum_no_floors_kept_idle": c["opt0_gap_cost"],
            "optimum_no_floors_boots": int(round(c["opt0_boots"])),
            "cost_ratio": c["cost"] / feasible if feasible else math.inf,
            "cost_ratio_no_floors": c["cost"] / no_floors if no_floors else math.inf,
            "cost_ratio_lower_bound": c["cost"] / c["opt_cost"] if c["opt_cost"] else math.inf,
            "cost_work": c["work_cost"],
            "cost_boot": c["boot_cost"],
            "cost_lost_work": c["lost_cost"],
            "cost_idle": idle_cost,
            "spot_share_worker_time": c["spot_worker_s"] / max(c["spot_worker_s"] + c["od_worker_s"], 1.0),
            "busy_worker_h": c["work_s"] / 3600.0,
            "by_kind": {
                k: {
                    "pools": sum(1 for p in self.pools if p.kind == k),
                    "cost": v[0],
                    "lower_bound": v[1],
                    "optimum": v[1] + v[5] + v[6],
                    "optimum_floors_idle": v[6],
                    "optimum_no_floors": v[1] + v[7],
                    "ratio": v[0] / (v[1] + v[5] + v[6]) if v[1] + v[5] + v[6] else math.inf,
                    "ratio_no_floors": v[0] / (v[1] + v[7]) if v[1] + v[7] else math.inf,
                    "ratio_lower_bound": v[0] / v[1] if v[1] else math.inf,
                    "busy": v[3],
                    "booting": v[2],
                    "lost_work": v[4],
                    "idle": v[0] - v[2] - v[3] - v[4],
                    "wait_p50_s": self.hists[k].quantile(0.5),
                    "wait_p99_s": self.hists[k].quantile(0.99),
                    "inputs": self.hists[k].total,
                }
                for k, v in self.by_kind.items()
            },
            "paid_worker_h": (c["spot_worker_s"] + c["od_worker_s"]) / 3600.0,
        }


# --- output ------------------------------------------------------------------------------------------------


def _money(x: float) -> str:
    return f"${x:,.0f}"


def render(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    title = f"autoscale_sim: {r['pools']:,} pools, {r['hours']:g} h of load (seed {r['seed']}, tick {r['tick_s']:g} s)"
    if r.get("no_estimates"):
        title += "\nWHAT-IF: no service-time or start-up estimates (rule 1 asks for a slot per queued input)"
    if r.get("bare_settings"):
        title += "\nWHAT-IF: every pool with min_containers=0, buffer_containers=0, scaledown_window=60"
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
        f"{r['speedup']:,.0f}× / {r['speedup_to_horizon']:,.0f}× ({r['hours']:g} h in {r['wall_at_horizon_s']:.1f} s)",
        "≥ 1,000×",
        yes(min(r["speedup"], r["speedup_to_horizon"]) >= 1000),
    )
    t.add_row(
        "decisions per wall second",
        f"{r['decisions_per_s']:,.0f}",
        "",
        "",
    )
    t.add_row(
        "  autoscaler / placement calls", f"{r['autoscaler_calls']:,} / {r['placement_calls']:,}", "", ""
    )
    t.add_row("peak live workers", f"{r['peak_workers']:,} (at {r['peak_at_h']:.1f} h)", "", "")
    t.add_row(
        "peak hour: workers paid / busy (average)",
        f"{r['peak_hour_paid_workers']:,.0f} / {r['peak_hour_busy_workers']:,.0f}",
        "~20,000 at peak",
        "",
    )
    t.add_row("workers launched (spot)", f"{r['launched']:,} ({r['launched_spot']:,})", "", "")
    t.add_row(
        "launch failures: capacity / quota",
        f"{r['capacity_failures']:,} / {r['quota_failures']:,}",
        "",
        "",
    )
    t.add_row(
        "preemptions (while booting)", f"{r['preemptions']:,} ({r['preempted_while_booting']:,})", "", ""
    )
    t.add_row(
        "spot fallbacks / restores / on-demand replaced",
        f"{r['fallbacks']:,} / {r['restores']:,} / {r['replaced_on_demand']:,}",
        "",
        "",
    )
    t.add_row("inputs in / results out", f"{r['inputs_in']:,} / {r['inputs_out']:,}", "", "")
    t.add_row("inputs requeued by preemption", f"{r['inputs_requeued']:,}", "", "")
    t.add_row(
        "inputs lost (in − out − left) / left unserved",
        f"{r['inputs_lost']:,} / {r['inputs_left']:,}",
        "0",
        yes(r["inputs_lost"] == 0 and r["inputs_left"] == 0),
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
        "cost (feasible offline optimum, with the declared floors)",
        f"{_money(r['optimum'])} ({_money(r['lower_bound'])} busy + {_money(r['optimum_startups'])}"
        f" start-ups + {_money(r['optimum_kept_idle'])} kept idle + {_money(r['optimum_floors_idle'])}"
        f" floors idle; {r['optimum_boots']:,} boots)",
        "",
        "",
    )
    t.add_row(
        "cost / feasible optimum",
        f"{r['cost_ratio']:.3f} (+{(r['cost_ratio'] - 1) * 100:.1f}%)",
        "≤ 1.10",
        yes(r["cost_ratio"] <= 1.10),
    )
    t.add_row(
        "cost / feasible optimum without the declared floors",
        f"{r['cost_ratio_no_floors']:.3f} (optimum {_money(r['optimum_no_floors'])}:"
        f" {_money(r['optimum_no_floors_startups'])} start-ups + {_money(r['optimum_no_floors_kept_idle'])}"
        f" kept idle; {r['optimum_no_floors_boots']:,} boots)",
        "",
        "",
    )
    t.add_row(
        "cost / lower bound (no start-up, no idle)",
        f"{r['cost_ratio_lower_bound']:.3f} (+{(r['cost_ratio_lower_bound'] - 1) * 100:.1f}%)",
        "",
        "",
    )
    t.add_row(
        "  cost: busy / booting / idle / lost work",
        f"{_money(r['cost_work'])} / {_money(r['cost_boot'])} / {_money(r['cost_idle'])} / {_money(r['cost_lost_work'])}",
        "",
        "",
    )
    t.add_row(
        "  busy at paid price / lower bound", f"{r['cost_work'] / max(r['lower_bound'], 1e-9):.3f}", "", ""
    )
    for kind, k in r["by_kind"].items():
        t.add_row(
            f"  {kind}: cost / feasible optimum (busy, booting, idle); / without floors; / lower bound",
            f"{_money(k['cost'])} / {_money(k['optimum'])} = {k['ratio']:.3f} "
            f"({_money(k['busy'])}, {_money(k['booting'])}, {_money(k['idle'])});"
            f" {k['ratio_no_floors']:.3f}; {k['ratio_lower_bound']:.3f}",
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


def default_catalog_dir() -> Path:
    """``CLOUDMODAL_CATALOG_DIR``, else the shared snapshot beside the repository (``../shared``)."""
    return Path(
        os.environ.get("CLOUDMODAL_CATALOG_DIR") or REPO.parent / "shared" / "pricing" / "catalogs" / "v8"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24.0)
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
    args.catalog_dir = args.catalog_dir or default_catalog_dir()
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
