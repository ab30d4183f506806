"""The spot market policy of a pool, and the offers a failed launch blocks. Pure: no clock, no I/O.

Every method takes ``now`` (the caller's clock) and a pool's :class:`PoolMarketState`, which the caller owns
(one per pool); the policy itself holds only settings, so one instance serves every pool. The reconciler
turns the messages returned by the ``record_*`` methods into ``pool.spot_fallback`` / ``pool.spot_restored``
events.

Rules:

1. **Fallback to on-demand.** A pool that asked for ``spot="allow"`` falls back to on-demand when, within
   ``window_s``, it sees ``failure_threshold`` spot launch failures with no spot success in between (a
   success clears the count: one dry zone is not a dry market, failover just moves on), or
   ``preemption_threshold`` preemptions. A big pool counts preemptions as a rate: the limit is the larger of
   ``preemption_threshold`` and ``preemption_fraction`` of its live spot workers, because 200 spot workers at
   a few % an hour lose 3 in ten minutes in normal weather, and falling back then would only cost money.
   When the caller says which offer each preempted worker ran on, a storm from a single offer is that
   offer's capacity running out, not the market's: :meth:`MarketPolicy.reclaimed` tells the caller to block
   the offer (failover then moves on to other spot offers), and the pool falls back only when the
   preemptions come from two offers or more.
2. **While fallen back**, :meth:`MarketPolicy.spot_mode` turns "allow" into "never", except one probe every
   ``probe_interval_s`` ("allow": spot competes on price again for that one launch). Granting a probe uses it.
   After a fallback caused by preemptions, probes wait until the preemptions in the window drop below the
   limit that triggered it. "require" and "never" pass through untouched: the user chose the market.
3. **Back to spot.** A spot launch that succeeds ends the fallback (after a preemption fallback, only once the
   preemptions in the window are below the limit again). Then :meth:`MarketPolicy.to_replace` moves the
   pool's on-demand workers above ``min_on_demand`` back to spot, most expensive first, one per call and at
   most one per ``replace_interval_s``, only when spot is at least ``replace_margin`` cheaper, and only once
   spot has launched fine for ``probe_interval_s`` since the fallback ended.
4. **Blocked offers.** A capacity failure blocks the offer (in that market) for ``block_capacity_s``; a quota
   failure blocks every offer of the same cloud, GPU type and market for ``block_quota_s`` (spot and
   on-demand quotas are separate on AWS, GCP and Azure). :class:`BlockList` keeps the entries and hands
   placement the active set.
5. **Blocked classes.** A GPU type can be out of stock on a whole cloud, or everywhere, and a catalog lists
   hundreds of offers of it: blocking them one failed launch at a time never reaches the next tier. So
   :meth:`MarketPolicy.record_stockout` counts capacity failures by class: ``class_stockouts`` distinct offers
   of one GPU type and market on one cloud failing within ``window_s`` (with no launch of that class
   succeeding in between) block the class on that cloud, and ``type_stockouts`` such offers on any clouds
   block the GPU type in that market on every cloud, both for ``block_capacity_s``. A tier then costs at most
   ``type_stockouts`` failed launches per market before the walk moves on (:meth:`MarketPolicy.tier_bound`).

>>> p, s = MarketPolicy(MarketSettings(failure_threshold=2)), PoolMarketState()
>>> p.record_spot_failure(s, 0.0) is None, p.record_spot_failure(s, 10.0) is not None
(True, True)
>>> p.spot_mode("allow", s, 20.0), p.spot_mode("allow", s, 130.0), p.spot_mode("allow", s, 131.0)
('never', 'allow', 'never')
>>> p.record_spot_success(s, 135.0) is not None, p.spot_mode("allow", s, 136.0)
(True, 'allow')
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from cloudmodal.exception import InvalidError
from cloudmodal.pricing.offers import ON_DEMAND, Offer, OfferKey

SpotMode = Literal["allow", "require", "never"]
FallbackReason = Literal["launch failures", "preemptions"]

__all__ = [
    "BlockList",
    "MarketPolicy",
    "MarketSettings",
    "PoolMarketState",
    "SpotMode",
    "StockoutClass",
    "StockoutLog",
    "quota_scope",
]


def _fmt_s(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class MarketSettings:
    """Thresholds and durations of the spot market policy (seconds; counts are per pool).

    >>> MarketSettings(window_s=0)
    Traceback (most recent call last):
    ...
    cloudmodal.exception.InvalidError: Invalid MarketSettings.window_s 0: give a positive number of seconds.
    """

    failure_threshold: int = 3  # spot launch failures within window_s -> fall back to on-demand
    preemption_threshold: int = 3  # preemptions within window_s -> fall back to on-demand
    window_s: float = 600.0
    probe_interval_s: float = 120.0  # while fallen back, allow one spot attempt this often
    block_capacity_s: float = 300.0  # how long a capacity failure blocks an offer
    block_quota_s: float = 1800.0  # how long a quota failure blocks an offer (whole cloud+gpu for quota)
    # Added: preemptions as a rate for big pools, and how on-demand workers move back to spot.
    preemption_fraction: float = 0.25  # ... or this fraction of the pool's live spot workers, if more
    replace_margin: float = 0.10  # replace on-demand by spot only when spot is this much cheaper
    replace_interval_s: float = 10.0  # at most one replacement this often
    # Stockouts by class (rule 5): distinct offers out of capacity within window_s that block a GPU type and
    # market on one cloud, and on every cloud.
    class_stockouts: int = 3
    type_stockouts: int = 6

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "preemption_threshold", "class_stockouts", "type_stockouts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidError(f"Invalid MarketSettings.{name} {v!r}: give a whole number ≥ 1.")
        for name in ("window_s", "probe_interval_s", "block_capacity_s", "block_quota_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0 or math.isinf(v):
                raise InvalidError(f"Invalid MarketSettings.{name} {v!r}: give a positive number of seconds.")
        v = self.replace_interval_s
        if not isinstance(v, int | float) or isinstance(v, bool) or not v >= 0 or math.isinf(v):
            raise InvalidError(f"Invalid MarketSettings.replace_interval_s {v!r}: give seconds ≥ 0.")
        for name in ("preemption_fraction", "replace_margin"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
                raise InvalidError(f"Invalid MarketSettings.{name} {v!r}: give a fraction in [0, 1).")


@dataclass
class PoolMarketState:
    """One pool's market history, owned by the caller and updated by :class:`MarketPolicy` (times are the
    caller's clock). ``fallback_since`` is None while the pool uses spot normally."""

    spot_failures: deque[float] = field(default_factory=deque)
    preemptions: deque[float] = field(default_factory=deque)
    fallback_since: float | None = None
    last_probe: float | None = None
    # Added: why the pool fell back, the preemption limit then, when it came back, the last replacement.
    fallback_reason: FallbackReason | None = None
    preemption_limit: int = 0
    restored_at: float | None = None
    last_replace: float | None = None
    preempted_offers: deque[OfferKey | None] = field(default_factory=deque)  # beside ``preemptions``

    @property
    def fallen_back(self) -> bool:
        return self.fallback_since is not None

    def to_wire(self) -> dict[str, Any]:
        """JSON-able, for the pool's row: a control plane that takes over keeps the pool's market history."""
        return {
            "spot_failures": list(self.spot_failures),
            "preemptions": list(self.preemptions),
            "preempted_offers": [list(k) if k is not None else None for k in self.preempted_offers],
            "fallback_since": self.fallback_since,
            "last_probe": self.last_probe,
            "fallback_reason": self.fallback_reason,
            "preemption_limit": self.preemption_limit,
            "restored_at": self.restored_at,
            "last_replace": self.last_replace,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PoolMarketState:
        times = [float(t) for t in d.get("preemptions") or ()]
        offers = [OfferKey(*k) if k is not None else None for k in d.get("preempted_offers") or ()]
        if len(offers) != len(times):
            offers = [None] * len(times)
        return cls(
            spot_failures=deque(float(t) for t in d.get("spot_failures") or ()),
            preemptions=deque(times),
            fallback_since=d.get("fallback_since"),
            last_probe=d.get("last_probe"),
            fallback_reason=d.get("fallback_reason"),
            preemption_limit=int(d.get("preemption_limit") or 0),
            restored_at=d.get("restored_at"),
            last_replace=d.get("last_replace"),
            preempted_offers=deque(offers),
        )

    def fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever the state does (cheap; to know when the pool's row is stale)."""
        return (
            len(self.spot_failures),
            self.spot_failures[-1] if self.spot_failures else None,
            len(self.preemptions),
            self.preemptions[-1] if self.preemptions else None,
            self.fallback_since,
            self.last_probe,
            self.restored_at,
            self.last_replace,
        )


def _prune(times: deque[float], since: float) -> int:
    while times and times[0] <= since:
        times.popleft()
    return len(times)


def _prune_preemptions(state: PoolMarketState, since: float) -> int:
    times, offers = state.preemptions, state.preempted_offers
    if len(offers) != len(times):  # a caller appended to one deque only: offers unknown from here on
        offers.clear()
        offers.extend([None] * len(times))
    while times and times[0] <= since:
        times.popleft()
        offers.popleft()
    return len(times)


class StockoutClass(NamedTuple):
    """Offers of one GPU type in one market, on one cloud (``cloud`` None: on every cloud)."""

    gpu: str
    market: str
    cloud: str | None = None

    def describe(self) -> str:
        return f"{self.gpu} {self.market} on {self.cloud or 'every cloud'}"


@dataclass
class StockoutLog:
    """Capacity failures by class, and the classes blocked (owned by the caller: one per control plane, since
    a cloud's stock is the same for every pool). Updated by :meth:`MarketPolicy.record_stockout`."""

    # (cloud, gpu, market) -> offer -> when it last failed; (None, gpu, market) counts every cloud.
    failures: dict[tuple[str | None, str, str], dict[OfferKey, float]] = field(default_factory=dict)
    blocked: dict[StockoutClass, tuple[float, str]] = field(default_factory=dict)  # -> (until, reason)

    def active(self, now: float) -> list[tuple[StockoutClass, float, str]]:
        """Classes blocked at ``now`` as ``(class, until, reason)``; expired ones are dropped."""
        for c in [c for c, (until, _) in self.blocked.items() if until <= now]:
            del self.blocked[c]
        return [(c, until, why) for c, (until, why) in self.blocked.items()]

    def covering(self, key: OfferKey, now: float) -> StockoutClass | None:
        """The blocked class ``key`` belongs to, if any (the cloud's first, then every cloud's)."""
        for c in (StockoutClass(key.gpu, key.market, key.cloud), StockoutClass(key.gpu, key.market)):
            got = self.blocked.get(c)
            if got is not None and got[0] > now:
                return c
        return None


class MarketPolicy:
    """The spot market decisions for pools (stateless apart from its settings; one serves every pool)."""

    __slots__ = ("settings",)

    def __init__(self, settings: MarketSettings = MarketSettings()) -> None:  # noqa: B008 - frozen, shared
        self.settings = settings

    # -- which market -------------------------------------------------------------------------------------
    def probe_due(self, state: PoolMarketState, now: float) -> bool:
        """Whether a fallen-back pool may try spot once now (does not use the probe; see :meth:`spot_mode`)."""
        if state.fallback_since is None:
            return False
        s = self.settings
        last = (
            state.fallback_since if state.last_probe is None else max(state.fallback_since, state.last_probe)
        )
        if now - last < s.probe_interval_s:
            return False
        if state.fallback_reason == "preemptions":
            return _prune_preemptions(state, now - s.window_s) < state.preemption_limit
        return True

    def spot_mode(self, requested: SpotMode, state: PoolMarketState, now: float) -> SpotMode:
        """The ``spot=`` to pass to ``PlacementPolicy`` for the next launch of this pool.

        "never" and "require" pass through. "allow" becomes "never" while the pool is fallen back, except
        when a probe is due: then "allow" once (the probe is used by this call).
        """
        if requested != "allow" or state.fallback_since is None:
            return requested
        if self.probe_due(state, now):
            state.last_probe = now
            return "allow"
        return "never"

    # -- what happened ------------------------------------------------------------------------------------
    def _enter(self, state: PoolMarketState, now: float, reason: FallbackReason, why: str) -> str:
        state.fallback_since = now
        state.last_probe = None
        state.fallback_reason = reason
        state.restored_at = None
        return (
            f"spot → on-demand: {why}; new workers launch on demand, "
            f"trying spot again once every {_fmt_s(self.settings.probe_interval_s)}"
        )

    def record_spot_failure(self, state: PoolMarketState, now: float) -> str | None:
        """A spot launch failed (capacity or quota). Returns the event message when the pool falls back."""
        s = self.settings
        state.spot_failures.append(now)
        n = _prune(state.spot_failures, now - s.window_s)
        if state.fallback_since is None and n >= s.failure_threshold:
            return self._enter(
                state, now, "launch failures", f"{n} spot launch failures in the last {_fmt_s(s.window_s)}"
            )
        return None

    def preemption_limit(self, spot_workers: int = 0) -> int:
        """Preemptions within the window that make a pool with ``spot_workers`` live spot workers fall back."""
        s = self.settings
        return max(s.preemption_threshold, math.ceil(s.preemption_fraction * max(spot_workers, 0)))

    def record_preemption(
        self, state: PoolMarketState, now: float, spot_workers: int = 0, offer: OfferKey | None = None
    ) -> str | None:
        """A spot worker got a preemption notice. ``spot_workers``: the pool's live spot workers before it
        (0 when unknown: the plain count threshold applies). ``offer``: what it ran on (None when unknown:
        every preemption counts as another offer). Returns the event message on falling back."""
        s = self.settings
        state.preemptions.append(now)
        state.preempted_offers.append(offer)
        n = _prune_preemptions(state, now - s.window_s)
        limit = self.preemption_limit(spot_workers)
        if state.fallback_since is None and n >= limit and self._offers_in_window(state) >= 2:
            state.preemption_limit = limit
            return self._enter(state, now, "preemptions", f"{n} preemptions in the last {_fmt_s(s.window_s)}")
        return None

    @staticmethod
    def _offers_in_window(state: PoolMarketState) -> int:
        """Distinct offers among the preemptions in the window (an unknown offer counts as a new one)."""
        seen: set[OfferKey] = set()
        unknown = 0
        for k in state.preempted_offers:
            if k is None:
                unknown += 1
            else:
                seen.add(k)
        return len(seen) + unknown

    def reclaimed(self, state: PoolMarketState, offer: OfferKey, now: float) -> bool:
        """Whether ``offer`` lost ``preemption_threshold`` of this pool's workers within the window: its spot
        capacity is gone, so the caller should block it (for ``block_capacity_s``) as a capacity failure."""
        _prune_preemptions(state, now - self.settings.window_s)
        return sum(1 for k in state.preempted_offers if k == offer) >= self.settings.preemption_threshold

    def record_spot_success(self, state: PoolMarketState, now: float) -> str | None:
        """A spot launch succeeded. Returns the event message when that ends a fallback."""
        state.spot_failures.clear()
        since = state.fallback_since
        if since is None:
            return None
        s = self.settings
        if (
            state.fallback_reason == "preemptions"
            and _prune_preemptions(state, now - s.window_s) >= state.preemption_limit
        ):
            return None  # launching works, but spot workers are still being reclaimed
        state.fallback_since = None
        state.last_probe = None
        state.fallback_reason = None
        state.restored_at = now
        return (
            f"on-demand → spot: a spot launch succeeded after {_fmt_s(now - since)} on demand; "
            "new workers use spot again and on-demand ones are moved back gradually"
        )

    # -- how many on demand -------------------------------------------------------------------------------
    def on_demand_floor(self, min_on_demand: int, live_on_demand: int) -> int:
        """How many more on-demand workers to launch to keep ``min_on_demand`` (the rest may be spot)."""
        return max(int(min_on_demand) - max(int(live_on_demand), 0), 0)

    def to_replace(
        self,
        state: PoolMarketState,
        workers: Sequence[tuple[str, str, float]],
        min_on_demand: int,
        spot_price: float | None,
        now: float,
    ) -> list[str]:
        """On-demand workers ``(id, market, $/h)`` to replace by a spot worker at ``spot_price`` $/h: at most
        one per call, the most expensive above the floor (the cheapest ``min_on_demand`` on-demand workers
        stay), and none while fallen back, right after a fallback, or when spot is not enough cheaper.
        The caller launches the spot replacement and drains the returned worker once it is ready, and leaves
        workers whose replacement is already on its way out of ``workers`` (they are gone, for the floor).
        Returning an id counts as a replacement for ``replace_interval_s``.
        """
        s = self.settings
        if spot_price is None or state.fallback_since is not None:
            return []
        if state.restored_at is not None and now - state.restored_at < s.probe_interval_s:
            return []
        if state.last_replace is not None and now - state.last_replace < s.replace_interval_s:
            return []
        od = [(price, wid) for wid, market, price in workers if market == ON_DEMAND]
        if len(od) <= max(min_on_demand, 0):
            return []
        price, wid = max(od, key=lambda pw: (pw[0], pw[1]))
        if spot_price > price * (1.0 - s.replace_margin):
            return []
        state.last_replace = now
        return [wid]

    # -- stockouts by class -------------------------------------------------------------------------------
    def record_stockout(
        self, log: StockoutLog, blocks: BlockList, key: OfferKey, now: float, offers: Iterable[Offer] = ()
    ) -> list[tuple[StockoutClass, float, str]]:
        """A launch of ``key`` failed for capacity (the caller blocks the offer itself with
        :meth:`block_failed_launch`). Returns the classes this blocks now, as ``(class, until, reason)``; each
        class's offers among ``offers`` (every offer the caller could launch) go into ``blocks``."""
        s = self.settings
        out: list[tuple[StockoutClass, float, str]] = []
        scopes: tuple[tuple[str | None, int], ...] = (
            (key.cloud, s.class_stockouts),
            (None, s.type_stockouts),
        )
        offers = list(offers)
        for cloud, threshold in scopes:
            c = StockoutClass(key.gpu, key.market, cloud)
            failed = log.failures.setdefault((cloud, key.gpu, key.market), {})
            failed[key] = now
            for k in [k for k, t in failed.items() if t <= now - s.window_s]:
                del failed[k]
            if len(failed) < threshold or log.covering(key, now) in (c, StockoutClass(key.gpu, key.market)):
                continue
            clouds = sorted({k.cloud for k in failed})
            reason = (
                f"{len(failed)} {key.gpu} {key.market} offers out of capacity within {_fmt_s(s.window_s)}"
                f" on {', '.join(clouds)}"
            )
            until = now + s.block_capacity_s
            failed.clear()  # counted afresh once the block ends
            log.blocked[c] = (until, reason)
            scope = [
                o.key(key.market)
                for o in offers
                if o.gpu == key.gpu
                and (cloud is None or o.cloud == cloud)
                and o.price(key.market) is not None
            ]
            blocks.block_all([key, *scope], until, f"{c.describe()} blocked: {reason}")
            out.append((c, until, reason))
        return out

    @staticmethod
    def record_launch_success(log: StockoutLog, key: OfferKey) -> None:
        """A launch of ``key`` succeeded: its class is not out of stock, so its failures stop counting."""
        log.failures.pop((key.cloud, key.gpu, key.market), None)
        log.failures.pop((None, key.gpu, key.market), None)

    def tier_bound(self, markets: int = 2) -> int:
        """Failed launches a tier out of stock everywhere costs at most before a walk reaches the next tier
        (``markets``: how many markets the pool may use), when its launches run one at a time; each launch
        already on its way when a class is blocked may add one more."""
        return max(int(markets), 1) * self.settings.type_stockouts

    # -- blocking -----------------------------------------------------------------------------------------
    def block_failed_launch(
        self,
        blocks: BlockList,
        key: OfferKey,
        now: float,
        reason: str,
        *,
        quota: bool = False,
        offers: Iterable[Offer] = (),
    ) -> float:
        """Block what a failed launch of ``key`` rules out; returns until when. Capacity: the offer in that
        market for ``block_capacity_s``. Quota: every offer in ``offers`` of the same cloud, GPU and market
        (and ``key`` itself) for ``block_quota_s``."""
        s = self.settings
        if quota:
            until = now + s.block_quota_s
            blocks.block_all([key, *quota_scope(key, offers)], until, reason)
        else:
            until = now + s.block_capacity_s
            blocks.block(key, until, reason)
        return until


def quota_scope(key: OfferKey, offers: Iterable[Offer]) -> list[OfferKey]:
    """The keys a quota failure on ``key`` rules out: the offers of ``offers`` with the same cloud and GPU
    type, in the same market (a quota is per cloud account and GPU family, and spot has its own)."""
    market = key.market
    out: list[OfferKey] = []
    for o in offers:
        if o.cloud == key.cloud and o.gpu == key.gpu and o.price(market) is not None:
            out.append(o.key(market))
    return out


class BlockList:
    """Offers (in one market) not to launch for a while, each with the reason, for placement's ``blocked=``.

    :meth:`active` is cheap to call on every placement: it returns the same frozenset until an entry is added
    or one expires. Blocking an offer already blocked keeps the later expiry (and that entry's reason).

    >>> from cloudmodal.pricing.offers import OfferKey
    >>> k = OfferKey("aws", "us-east-1", "us-east-1a", "g5.xlarge", "A10", 1, "spot")
    >>> b = BlockList(); b.block(k, 300.0, "NoCapacityError: InsufficientInstanceCapacity")
    >>> k in b.active(299.0), k in b.active(300.0), b.reason(k)
    (True, False, None)
    """

    __slots__ = ("_active", "_entries", "_heap", "_seq", "_valid_until")

    def __init__(self) -> None:
        self._entries: dict[OfferKey, tuple[float, str]] = {}
        self._heap: list[tuple[float, int, OfferKey]] = []  # (until, seq, key); stale rows are skipped
        self._seq = itertools.count()
        self._active: frozenset[OfferKey] | None = frozenset()
        self._valid_until = math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def block(self, key: OfferKey, until: float, reason: str) -> None:
        """Block ``key`` until ``until`` (the caller's clock) because of ``reason``."""
        cur = self._entries.get(key)
        if cur is not None and cur[0] >= until:
            return
        self._entries[key] = (until, reason)
        heapq.heappush(self._heap, (until, next(self._seq), key))
        self._active = None

    def block_all(self, keys: Iterable[OfferKey], until: float, reason: str) -> int:
        """Block each of ``keys``; returns how many there were."""
        n = 0
        for k in keys:
            self.block(k, until, reason)
            n += 1
        return n

    def unblock(self, key: OfferKey) -> None:
        if self._entries.pop(key, None) is not None:
            self._active = None

    def _expire(self, now: float) -> None:
        heap, entries = self._heap, self._entries
        while heap and heap[0][0] <= now:
            until, _, key = heapq.heappop(heap)
            cur = entries.get(key)
            if cur is not None and cur[0] == until:
                del entries[key]
                self._active = None

    def active(self, now: float) -> frozenset[OfferKey]:
        """The keys blocked at ``now`` (an entry is active while ``now < until``); expired entries are dropped."""
        if self._active is not None and now < self._valid_until:
            return self._active
        self._expire(now)
        self._active = frozenset(self._entries)
        self._valid_until = self._heap[0][0] if self._heap else math.inf
        return self._active

    def reason(self, key: OfferKey) -> str | None:
        """Why ``key`` is blocked, or None (entries that expired are gone once :meth:`active` has seen it)."""
        cur = self._entries.get(key)
        return cur[1] if cur is not None else None

    def until(self, key: OfferKey) -> float | None:
        cur = self._entries.get(key)
        return cur[0] if cur is not None else None

    def entries(self, now: float) -> list[tuple[OfferKey, float, str]]:
        """Active entries as ``(key, until, reason)``, soonest expiry first (for events and the CLI)."""
        self.active(now)
        return sorted(((k, u, r) for k, (u, r) in self._entries.items()), key=lambda e: (e[1], str(e[0])))
