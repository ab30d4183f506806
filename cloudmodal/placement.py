"""Placement: rank the offers that can run a GPU request. Pure: no I/O, no clock.

``rank(tiers, offers, ...)`` walks the user's GPU tiers in order and returns every launchable
(offer, market) pair as a ranked :class:`Candidate`; with ``explain=True`` it also returns a
:class:`Rejection` with a reason for each offer of a requested GPU type that was dropped. ``walk(...)`` is
the order one launch tries candidates in: ranked afresh whenever a list runs out, skipping what was blocked
meanwhile (by this launch's failures or another's), at most ``max_tries`` of them.

Matching follows SkyPilot: ``H100:2`` matches offers with exactly 2 H100s; ``ANY:2`` any GPU type, 2 of them.
Order: tiers in the user's order, cheapest first within a tier, spot and on-demand as separate candidates
competing on price (``across_tiers=True``: all tiers together by price). Ties: more vCPUs, then more RAM,
on-demand before spot, then cloud, region, zone and instance type names.

Data locality (``locality=``, a :class:`DataLocality`): a function that mounts volumes reads them where they
are. *A run* is one worker's life: a worker reads each mounted volume's current version once, when it starts
(the mount writes a working copy out), and then lives ``worker_hours`` (default 1 h, an estimate: the control
plane does not know how long a pool will keep a worker). Each candidate carries ``egress``, the USD that
start costs in data transfer from the volumes' locations to the offer's region
(:func:`cloudmodal.pricing.egress.egress_cost`), and offers compare on ``price + egress / worker_hours``
instead of ``price`` (the same order as price × hours + egress per run). Tiers still come in the user's order;
the ``max_price_per_hour`` cap applies to the price alone. A location or size that is not known costs 0 (never
a penalty) and :attr:`Placement.notes` says so; the notes also say when an offer near the data ranks above a
cheaper far one, and why. Without ``locality`` (no volume mounted) nothing changes.

>>> from cloudmodal.gpu import parse_gpu
>>> from cloudmodal.pricing.offers import Offer
>>> o = Offer("aws", "us-east-1", "use1-az1", "p5.4xlarge", "H100", 1, 80, 16, 256, 6.88, 2.5, "t", "2026-01-01")
>>> [(c.offer.instance_type, c.market, c.price) for c in rank(parse_gpu("H100"), [o]).candidates]
[('p5.4xlarge', 'spot', 2.5), ('p5.4xlarge', 'on-demand', 6.88)]
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

from cloudmodal.exception import InvalidError
from cloudmodal.gpu import GpuTier
from cloudmodal.pricing.egress import DEFAULT_RATES, DataLocation, EgressRate, egress_rate
from cloudmodal.pricing.gpus import ANY
from cloudmodal.pricing.offers import ON_DEMAND, SPOT, Market, Offer, OfferKey, OfferTable, RankEntry

if TYPE_CHECKING:
    from cloudmodal.spec import FunctionSpec

SpotPolicy = Literal["allow", "require", "never"]
_SPOT_CHOICES = ("allow", "require", "never")

__all__ = [
    "DEFAULT_WORKER_HOURS",
    "Candidate",
    "DataLocality",
    "DataRead",
    "Market",
    "OfferKey",
    "Placement",
    "PlacementPolicy",
    "Rejection",
    "SignalLike",
    "rank",
    "walk",
]

T = TypeVar("T")


class SignalLike(Protocol):
    """A live observation (``cloudmodal.providers.base.Signal``): ``None`` fields widen its scope."""

    cloud: str
    region: str
    zone: str | None
    instance_type: str | None
    gpu: str | None
    available: bool | None
    quota_left_gpus: int | None


def _names(value: str | Iterable[str] | None, what: str) -> frozenset[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = frozenset(s.strip().lower() for s in items if s and s.strip())
    if not out:
        raise InvalidError(f"Empty {what} list. Leave it unset to allow any {what}.")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementPolicy:
    """Which offers a request may use.

    ``spot``: "allow" (spot and on-demand compete on price), "require" (spot only) or "never".
    ``clouds`` / ``regions``: allowed names (case-insensitive); None allows all.
    ``max_price_per_hour``: cap on the candidate's $/h in its market. ``across_tiers``: rank all tiers
    together by price instead of tier by tier.

    >>> PlacementPolicy(spot="never", clouds=["AWS", "gcp"]).clouds == frozenset({"aws", "gcp"})
    True
    """

    spot: SpotPolicy = "allow"
    clouds: frozenset[str] | None = None
    regions: frozenset[str] | None = None
    max_price_per_hour: float | None = None
    across_tiers: bool = False

    def __post_init__(self) -> None:
        if self.spot not in _SPOT_CHOICES:
            raise InvalidError(
                f"Invalid spot policy {self.spot!r}: use one of {', '.join(map(repr, _SPOT_CHOICES))}."
            )
        object.__setattr__(self, "clouds", _names(self.clouds, "cloud"))
        object.__setattr__(self, "regions", _names(self.regions, "region"))
        m = self.max_price_per_hour
        if m is not None and not (isinstance(m, int | float) and m > 0):
            raise InvalidError(f"Invalid max_price_per_hour {m!r}: give a positive number of USD per hour.")

    @property
    def markets(self) -> tuple[Market, ...]:
        return {"allow": (ON_DEMAND, SPOT), "require": (SPOT,), "never": (ON_DEMAND,)}[self.spot]

    @classmethod
    def from_spec(cls, spec: FunctionSpec, *, across_tiers: bool = False) -> PlacementPolicy:
        """The policy a function declared (``cloud``, ``region``, ``spot``, ``nonpreemptible``, max $/h)."""
        spot: SpotPolicy = "never" if spec.nonpreemptible else spec.spot
        return cls(
            spot=spot,
            clouds=frozenset({spec.cloud}) if spec.cloud else None,
            regions=frozenset(spec.region) if spec.region else None,
            max_price_per_hour=spec.max_price_per_hour,
            across_tiers=across_tiers,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "spot": self.spot,
            "clouds": sorted(self.clouds) if self.clouds is not None else None,
            "regions": sorted(self.regions) if self.regions is not None else None,
            "max_price_per_hour": self.max_price_per_hour,
            "across_tiers": self.across_tiers,
        }


DEFAULT_WORKER_HOURS = 1.0  # how long a run (one worker) is taken to last when egress is weighed against $/h


@dataclass(frozen=True, slots=True)
class DataRead:
    """Data each worker reads when it starts: ``gb`` GB (None: size not known) at ``location``."""

    name: str  # for messages: the volume's name
    location: DataLocation
    gb: float | None
    why: str = ""  # when ``gb`` is None: why the size is not known

    def __post_init__(self) -> None:
        if self.gb is not None and not (isinstance(self.gb, int | float) and 0 <= self.gb < 1e15):
            raise InvalidError(f"Invalid size {self.gb!r} GB for {self.name!r}: give 0 or more, or None.")

    def __str__(self) -> str:
        gb = self.gb
        size = (
            "size unknown"
            if gb is None
            else f"{gb:,.1f} GB"
            if gb >= 1 or gb == 0
            else f"{gb * 1024:,.1f} MB"
        )
        return f"{self.name} ({size} in {self.location})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DataLocality:
    """What a run of the function reads, and where (see the module docstring for what a run is).

    >>> from cloudmodal.pricing.egress import DataLocation
    >>> d = DataLocality(reads=(DataRead("weights", DataLocation("aws", "us-east-1"), 100.0),))
    >>> d.egress("gcp", "us-central1"), d.egress("aws", "us-east-1")
    (9.0, 0.0)
    """

    reads: tuple[DataRead, ...]
    worker_hours: float = DEFAULT_WORKER_HOURS
    rates: Mapping[str, EgressRate] = field(default_factory=lambda: DEFAULT_RATES)

    def __post_init__(self) -> None:
        h = self.worker_hours
        if not (isinstance(h, int | float) and 0 < h < 1e9):
            raise InvalidError(
                f"Invalid worker_hours {h!r}: give the hours a worker is expected to live (> 0)."
            )
        object.__setattr__(self, "reads", tuple(self.reads))

    @property
    def weighs(self) -> bool:
        """Whether any read can cost something (a size and at least the cloud known)."""
        return any(r.gb and r.location.cloud is not None for r in self.reads)

    def egress(self, cloud: str, region: str) -> float:
        """USD in data transfer for one worker started in ``cloud``/``region`` (unknowns count 0)."""
        total = 0.0
        for r in self.reads:
            if r.gb:
                rate = egress_rate(r.location, cloud, region, self.rates)
                if rate:
                    total += rate * r.gb
        return total

    def per_hour(self, c: Candidate) -> float:
        """The figure candidates compare on: $/h plus the egress spread over the worker's hours."""
        return c.price + (c.egress or 0.0) / self.worker_hours

    def notes(self) -> list[str]:
        """What is not known, and so not counted."""
        out = []
        for r in self.reads:
            if r.gb is None:
                out.append(
                    f"volume {r.name!r}: size not known ({r.why or 'no committed version read'}); "
                    "its egress is not counted"
                )
            elif r.location.cloud is None:
                out.append(
                    f"volume {r.name!r}: location not known ({r.location.why}); its egress is not counted"
                )
            elif not r.location.known:
                out.append(
                    f"volume {r.name!r}: in {r.location.cloud}, region not known ({r.location.why}); "
                    f"egress to other {r.location.cloud} regions is not counted"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_hours": self.worker_hours,
            "volumes": [
                {"name": r.name, "location": str(r.location), "known": r.location.known, "gb": r.gb}
                for r in self.reads
            ],
        }


class Candidate(NamedTuple):
    """One launchable option: an offer in a market at a price, for the tier at ``tier_index``."""

    offer: Offer
    tier_index: int
    tier: GpuTier
    market: Market
    price: float
    key: OfferKey  # the offer in this market: what a failed launch blocks
    egress: float | None = None  # USD of data transfer per worker start; None: no data locality given

    def to_dict(self) -> dict[str, Any]:
        d = self.offer.to_dict()
        d.update(tier=str(self.tier), tier_index=self.tier_index, market=self.market, price=self.price)
        if self.egress is not None:
            d["egress_usd"] = round(self.egress, 6)
        return d


# Reason codes of a Rejection; the message says the specifics.
COUNT = "count"
CLOUD = "cloud"
REGION = "region"
MIN_VCPUS = "min_vcpus"
MIN_MEMORY = "min_memory"
NO_PRICE = "no_price"
BLOCKED = "blocked"
MAX_PRICE = "max_price"
DUPLICATE = "duplicate"
UNAVAILABLE = "unavailable"
QUOTA = "quota"

_SignalIndex = Mapping[tuple[str, str], Sequence[SignalLike]]


def _index_signals(signals: Iterable[SignalLike]) -> _SignalIndex | None:
    """Signals that can rule an offer out (no capacity, too little quota), by (cloud, region)."""
    out: dict[tuple[str, str], list[SignalLike]] = {}
    for s in signals:
        if s.available is False or s.quota_left_gpus is not None:
            out.setdefault((s.cloud, s.region), []).append(s)
    return out or None


def _signal_reason(o: Offer, signals: Sequence[SignalLike]) -> tuple[str, str] | None:
    for s in signals:
        if s.zone is not None and s.zone != o.zone:
            continue
        if s.instance_type is not None and s.instance_type != o.instance_type:
            continue
        if s.gpu is not None and s.gpu != o.gpu:
            continue
        if s.available is False:
            return UNAVAILABLE, f"no capacity now in {s.zone or s.region} (live signal)"
        if s.quota_left_gpus is not None and s.quota_left_gpus < o.gpu_count:
            return (
                QUOTA,
                f"quota allows {s.quota_left_gpus} more GPU(s) in {s.region}, the offer has {o.gpu_count}",
            )
    return None


class Rejection(NamedTuple):
    """An offer of a requested GPU type that is not a candidate, and why (``market`` None: both markets)."""

    offer: Offer
    tier_index: int
    market: Market | None
    code: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        o = self.offer
        return {
            "cloud": o.cloud,
            "region": o.region,
            "zone": o.zone,
            "instance_type": o.instance_type,
            "gpu": o.gpu,
            "gpu_count": o.gpu_count,
            "tier_index": self.tier_index,
            "market": self.market,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Placement:
    """Ranked candidates (best first) and, when explained, the rejections."""

    tiers: tuple[GpuTier, ...]
    policy: PlacementPolicy
    candidates: tuple[Candidate, ...]
    rejections: tuple[Rejection, ...] = field(default=())
    locality: DataLocality | None = None
    notes: tuple[str, ...] = ()  # with a locality: what is not known, and why near data won over cheaper

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def __bool__(self) -> bool:
        return bool(self.candidates)

    def _truncated(self, limit: int) -> Placement:
        return Placement(
            self.tiers, self.policy, self.candidates[:limit], self.rejections, self.locality, self.notes
        )

    def rejection_counts(self) -> dict[str, int]:
        """How many rejections per reason code."""
        return dict(Counter(r.code for r in self.rejections).most_common())


_by_price_then_tier = itemgetter(4, 1)  # Candidate.price, Candidate.tier_index


def _table(offers: OfferTable | Iterable[Offer]) -> OfferTable:
    return offers if isinstance(offers, OfferTable) else OfferTable(offers)


def _rank_tier(
    entries: Sequence[RankEntry],
    ti: int,
    tier: GpuTier,
    policy: PlacementPolicy,
    markets: tuple[Market, ...],
    min_vcpus: float,
    min_memory_gb: float,
    blocked: Collection[OfferKey],
    signals: _SignalIndex | None,
    taken: set[OfferKey] | None,
    limit: int | None,
    rejections: list[Rejection] | None,
) -> list[Candidate]:
    """Candidates of one tier in order; ``entries`` is the table's pre-sorted list for the tier."""
    clouds, regions, max_price = policy.clouds, policy.regions, policy.max_price_per_hour
    both = len(markets) == 2
    only = markets[0]
    out: list[Candidate] = []
    append = out.append
    explain = rejections is not None
    dropped: set[int] = set()  # offers already rejected for a reason that covers both markets
    for e in entries:
        market = e.market
        if not both and market != only:
            continue
        o = e.offer
        why: str | None = None
        code = ""
        if clouds is not None and o.cloud not in clouds:
            code, why = CLOUD, f"cloud {o.cloud} not allowed (allowed: {', '.join(sorted(clouds))})"
        elif (
            regions is not None and o.region.lower() not in regions and (o.zone or "").lower() not in regions
        ):
            code, why = REGION, f"region {o.location} not allowed (allowed: {', '.join(sorted(regions))})"
        elif (o.vcpus or 0.0) < min_vcpus:
            code, why = MIN_VCPUS, f"{o.vcpus or 0:g} vCPUs, below the minimum {min_vcpus:g}"
        elif (o.memory_gb or 0.0) < min_memory_gb:
            code, why = MIN_MEMORY, f"{o.memory_gb or 0:g} GB RAM, below the minimum {min_memory_gb:g} GB"
        elif signals is not None and (sig := signals.get((o.cloud, o.region))) is not None:
            got = _signal_reason(o, sig)
            if got is not None:
                code, why = got
        if why is not None:
            if explain and id(o) not in dropped:
                dropped.add(id(o))
                rejections.append(Rejection(o, ti, None, code, why))  # type: ignore[union-attr]
            continue
        key = e.key
        if blocked and key in blocked:
            if explain:
                rejections.append(Rejection(o, ti, market, BLOCKED, f"blocked ({market})"))  # type: ignore[union-attr]
            continue
        price = e.price
        if max_price is not None and price > max_price:
            if explain:
                rejections.append(  # type: ignore[union-attr]
                    Rejection(
                        o, ti, market, MAX_PRICE, f"${price:g}/h {market}, over the cap ${max_price:g}/h"
                    )
                )
            continue
        if taken is not None:
            if key in taken:
                if explain:
                    rejections.append(  # type: ignore[union-attr]
                        Rejection(o, ti, market, DUPLICATE, "already a candidate for an earlier tier")
                    )
                continue
            taken.add(key)
        append(Candidate(o, ti, tier, market, price, key))
        if limit is not None and not explain and len(out) >= limit:
            break
    return out


def _explain_unpriced_and_counts(
    table: OfferTable, ti: int, tier: GpuTier, policy: PlacementPolicy, rejections: list[Rejection]
) -> None:
    """Rejections the sorted entries cannot show: other GPU counts, and no price in the only allowed market."""
    gpu = None if tier.type == ANY else tier.type
    pool = table.for_gpu(gpu) if gpu is not None else table.offers
    for o in pool:
        if o.gpu_count != tier.count:
            if gpu is not None:  # for ANY, every other-count offer would be listed: noise
                rejections.append(
                    Rejection(o, ti, None, COUNT, f"{o.gpu_count} × {o.gpu}, the tier asks for {tier.count}")
                )
            continue
        if policy.spot == "require" and o.price_spot is None:
            rejections.append(Rejection(o, ti, SPOT, NO_PRICE, "no spot price (spot is required)"))
        elif policy.spot == "never" and o.price_ondemand is None:
            rejections.append(Rejection(o, ti, ON_DEMAND, NO_PRICE, "no on-demand price (spot-only offer)"))


def rank(
    tiers: Sequence[GpuTier],
    offers: OfferTable | Iterable[Offer],
    *,
    min_vcpus: float = 0.0,
    min_memory_gb: float = 0.0,
    blocked: Collection[OfferKey] = frozenset(),
    signals: Iterable[SignalLike] = (),
    policy: PlacementPolicy | None = None,
    limit: int | None = None,
    explain: bool = False,
    locality: DataLocality | None = None,
) -> Placement:
    """Rank the offers that can run ``tiers`` (an ordered GPU fallback list).

    ``blocked``: offer keys not to use now (e.g. a launch there just failed). ``signals``: live observations;
    one with ``available=False`` or too little ``quota_left_gpus`` rules out the offers in its scope.
    ``limit``: stop after that many candidates (ignored with ``explain``, which walks everything to give
    each rejection). ``offers`` may be any iterable of offers; pass the :class:`OfferTable` to reuse its
    indexes (that is what makes repeated ranking fast). ``locality``: the data a run reads and where; offers
    then compare on price plus egress (see the module docstring), and each candidate carries its ``egress``.
    """
    policy = policy or PlacementPolicy()
    if limit is not None and limit < 1:
        raise InvalidError(f"Invalid limit {limit!r}: give a positive number of candidates, or None for all.")
    table = _table(offers)
    blocked = blocked if isinstance(blocked, set | frozenset | dict) else frozenset(blocked)
    signals = signals if isinstance(signals, tuple | list) else tuple(signals)
    if locality is not None and locality.weighs:
        return _rank_near_data(
            tiers, table, min_vcpus, min_memory_gb, blocked, signals, policy, limit, explain, locality
        )
    got = _rank_by_price(tiers, table, min_vcpus, min_memory_gb, blocked, signals, policy, limit, explain)
    if locality is None:
        return got
    # Nothing the function reads can cost anything (sizes or locations unknown): the price order stands.
    return Placement(
        got.tiers,
        got.policy,
        tuple(c._replace(egress=0.0) for c in got.candidates),
        got.rejections,
        locality,
        tuple(locality.notes()),
    )


_CHUNK = 256  # entries ranked at a time near data, between checks of whether the rest can still place


def _rank_near_data(
    tiers: Sequence[GpuTier],
    table: OfferTable,
    min_vcpus: float,
    min_memory_gb: float,
    blocked: Collection[OfferKey],
    signals: Sequence[SignalLike],
    policy: PlacementPolicy,
    limit: int | None,
    explain: bool,
    locality: DataLocality,
) -> Placement:
    """:func:`rank` with egress: each tier's candidates sorted by $/h plus egress per hour, stably so that the
    catalog's tie-breaks stand.

    A far offer early in the price order may fall behind a near one anywhere in it, so a tier is read past
    ``limit``: in chunks of its price-sorted entries, until the next entry's price alone is no lower than the
    ``limit``-th best cost found (egress is never negative, so nothing after it can place). Duplicates of ANY
    tiers go to the earlier tier (tier by tier) or to the lower cost (across tiers; each of a tier's first
    ``limit`` is enough there, since a tier never lists one offer twice)."""
    sig_index = _index_signals(signals)
    rejections: list[Rejection] | None = [] if explain else None
    across = policy.across_tiers
    by_region: dict[tuple[str, str], float] = {}  # egress depends on the offer's cloud and region only
    per_hour = locality.per_hour

    def weigh(c: Candidate) -> Candidate:
        where = (c.offer.cloud, c.offer.region)
        e = by_region.get(where)
        if e is None:
            e = by_region[where] = locality.egress(*where)
        return c._replace(egress=e)

    dedupe = any(t.type == ANY for t in tiers)
    taken: set[OfferKey] | None = set() if dedupe and not across else None
    ranked: list[Candidate] = []
    cheapest: list[Candidate] = []  # each tier's cheapest by price alone, for the note
    for ti, tier in enumerate(tiers):
        need = None if limit is None or explain else limit if across else limit - len(ranked)
        if need is not None and need <= 0:
            break
        entries = table.ranked(None if tier.type == ANY else tier.type, tier.count)
        step = len(entries) if explain else _CHUNK  # explain reads whole tiers (one rejection per offer)
        out: list[Candidate] = []
        for i in range(0, len(entries), step or 1):
            got = _rank_tier(
                entries[i : i + step],
                ti,
                tier,
                policy,
                policy.markets,
                min_vcpus,
                min_memory_gb,
                blocked,
                sig_index,
                None,
                None,
                rejections,
            )
            for c in got:
                if taken is not None and c.key in taken:
                    if rejections is not None:
                        rejections.append(
                            Rejection(
                                c.offer, ti, c.market, DUPLICATE, "already a candidate for an earlier tier"
                            )
                        )
                    continue
                out.append(weigh(c))
            nxt = i + step
            if need is not None and len(out) >= need and nxt < len(entries):
                if entries[nxt].price >= heapq.nsmallest(need, map(per_hour, out))[-1]:
                    break
        if rejections is not None:
            _explain_unpriced_and_counts(table, ti, tier, policy, rejections)
        if out:
            cheapest.append(out[0])  # entries come cheapest first
        out.sort(key=per_hour)
        if need is not None:
            out = out[:need]
        if taken is not None:
            taken.update(c.key for c in out)
        ranked += out
    if across:
        ranked.sort(key=lambda c: (per_hour(c), c.tier_index))
        if dedupe:
            ranked = _first_of_each_offer(ranked, set(), rejections)
    if limit is not None:
        ranked = ranked[:limit]
    notes = [*locality.notes(), *_near_data_note(ranked, cheapest, locality, across)]
    return Placement(tuple(tiers), policy, tuple(ranked), tuple(rejections or ()), locality, tuple(notes))


def _first_of_each_offer(
    ranked: Sequence[Candidate], taken: set[OfferKey], rejections: list[Rejection] | None
) -> list[Candidate]:
    """``ranked`` keeping each offer's first candidate (``taken``: keys already placed, updated here); the
    others are rejected as duplicates of another tier's."""
    unique: list[Candidate] = []
    for c in ranked:
        if c.key in taken:
            if rejections is not None:
                rejections.append(
                    Rejection(
                        c.offer, c.tier_index, c.market, DUPLICATE, "already a candidate for another tier"
                    )
                )
            continue
        taken.add(c.key)
        unique.append(c)
    return unique


def _near_data_note(
    ranked: Sequence[Candidate], cheapest: Sequence[Candidate], locality: DataLocality, across: bool
) -> list[str]:
    """Why the first candidate won over a cheaper one of its tier (of any tier, ``across``), when egress did."""
    if not ranked:
        return []
    best = ranked[0]
    pool = [c for c in cheapest if across or c.tier_index == best.tier_index]
    if not pool:
        return []
    cheap = min(pool, key=lambda c: c.price)
    if cheap.price >= best.price or (cheap.egress or 0.0) <= (best.egress or 0.0):
        return []
    h = locality.worker_hours
    data = ", ".join(str(r) for r in locality.reads if r.gb)
    return [
        f"near the data: {_where(best)} ranks first at ${best.price:,.2f}/h + ${best.egress or 0:,.2f} egress "
        f"per worker = ${locality.per_hour(best):,.2f}/h over a {h:g} h worker; the cheaper {_where(cheap)} "
        f"at ${cheap.price:,.2f}/h would add ${cheap.egress or 0:,.2f} egress to read {data} "
        f"= ${locality.per_hour(cheap):,.2f}/h"
    ]


def _where(c: Candidate) -> str:
    o = c.offer
    return f"{o.cloud} {o.location} {o.instance_type} ({c.market})"


def _rank_by_price(
    tiers: Sequence[GpuTier],
    table: OfferTable,
    min_vcpus: float,
    min_memory_gb: float,
    blocked: Collection[OfferKey],
    signals: Sequence[SignalLike],
    policy: PlacementPolicy,
    limit: int | None,
    explain: bool,
) -> Placement:
    """:func:`rank` without data locality: the catalog's pre-sorted lists, cut at ``limit`` as they are read."""
    markets = policy.markets
    sig_index = _index_signals(signals)
    rejections: list[Rejection] | None = [] if explain else None
    # Only an ANY tier can offer what another tier offers too (tiers are distinct type:count pairs).
    dedupe = any(t.type == ANY for t in tiers)
    taken: set[OfferKey] | None = set() if dedupe else None
    across = policy.across_tiers
    per_tier: list[list[Candidate]] = []
    found = 0
    for ti, tier in enumerate(tiers):
        entries = table.ranked(None if tier.type == ANY else tier.type, tier.count)
        # Across tiers, each tier keeps its own order (up to `limit`) and duplicates are settled at the merge.
        got = _rank_tier(
            entries,
            ti,
            tier,
            policy,
            markets,
            min_vcpus,
            min_memory_gb,
            blocked,
            sig_index,
            None if across else taken,
            limit if across or limit is None else limit - found,
            rejections,
        )
        if rejections is not None:
            _explain_unpriced_and_counts(table, ti, tier, policy, rejections)
        per_tier.append(got)
        found += len(got)
        if not across and limit is not None and rejections is None and found >= limit:
            break
    ranked = [c for tier_candidates in per_tier for c in tier_candidates]
    if across:
        # Each tier's list is sorted, so this stable sort is a merge of runs; ties go to the earlier tier.
        ranked.sort(key=_by_price_then_tier)
        if taken is not None:
            unique = _first_of_each_offer(ranked, taken, rejections)
            if limit is not None and len(unique) < limit and any(len(t) >= limit for t in per_tier):
                # Duplicates used up room that a truncated tier could have filled: rank in full.
                return _rank_by_price(
                    tiers, table, min_vcpus, min_memory_gb, blocked, signals, policy, None, explain
                )._truncated(limit)
            ranked = unique
    if limit is not None:
        ranked = ranked[:limit]
    return Placement(tuple(tiers), policy, tuple(ranked), tuple(rejections or ()))


def walk(
    ranked: Callable[[], Iterable[T]],
    key: Callable[[T], Hashable],
    blocked: Callable[[T], bool],
    max_tries: int,
) -> Iterator[T]:
    """The candidates one launch tries, in order, at most ``max_tries`` of them, each at most once.

    ``ranked()`` gives the current ranking (it sees the blocks added so far); ``blocked(c)`` is asked just
    before ``c`` is yielded, so a class blocked by a failure of this walk, or of a concurrent one sharing the
    blocks, is skipped for the rest of the list without a try. When a list runs out the walk ranks again, so
    a tier whose offers were blocked gives way to the next tier within the same walk; it ends when a
    ranking has nothing left to try. The caller stops iterating once a launch succeeds.

    >>> list(walk(lambda: [1, 2, 3, 4], key=lambda c: c, blocked=lambda c: c == 2, max_tries=2))
    [1, 3]
    """
    tried: set[Hashable] = set()
    while len(tried) < max_tries:
        fresh = False
        for c in ranked():
            k = key(c)
            if k in tried or blocked(c):
                continue
            tried.add(k)
            fresh = True
            yield c
            if len(tried) >= max_tries:
                return
        if not fresh:
            return
