"""The offer table: one row per (cloud, region, zone, instance type) that comes with GPUs, and its indexes.

An :class:`Offer` carries both prices; a market ("spot" or "on-demand") is chosen at placement. The table
indexes offers by GPU type and by (GPU type, count), and keeps for each (GPU type, count) the priced
(offer, market) pairs pre-sorted in placement order, so ranking a request walks a short sorted list
instead of the whole table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

Market = Literal["spot", "on-demand"]
SPOT: Market = "spot"
ON_DEMAND: Market = "on-demand"
MARKETS: tuple[Market, ...] = (SPOT, ON_DEMAND)


class OfferKey(NamedTuple):
    """Identity of one launchable thing: an offer in one market. Blocked offers are sets of these.

    The GPU is part of it because the machine type alone is ambiguous on GCP, where one N1 host type
    carries T4s, V100s or P4s. Build keys with :meth:`Offer.key` (or take ``Candidate.key``).
    """

    cloud: str
    region: str
    zone: str | None
    instance_type: str
    gpu: str
    gpu_count: int
    market: Market

    def __str__(self) -> str:
        where = f"{self.region}/{self.zone}" if self.zone else self.region
        return f"{self.cloud}:{where}:{self.instance_type}[{self.gpu}:{self.gpu_count}]:{self.market}"


@dataclass(frozen=True, slots=True)
class Offer:
    """A priced machine type in one place. Prices are USD per instance-hour; ``None`` = not sold so."""

    cloud: str
    region: str
    zone: str | None
    instance_type: str
    gpu: str  # canonical name (``cloudmodal.pricing.gpus.catalog_name``)
    gpu_count: int
    gpu_memory_gb: float  # per GPU
    vcpus: float
    memory_gb: float
    price_ondemand: float | None
    price_spot: float | None
    source: str
    date: str

    def price(self, market: Market) -> float | None:
        """The $/h in ``market``, or None when the offer is not sold in that market."""
        return self.price_spot if market == SPOT else self.price_ondemand

    def key(self, market: Market) -> OfferKey:
        return OfferKey(
            self.cloud, self.region, self.zone, self.instance_type, self.gpu, self.gpu_count, market
        )

    @property
    def markets(self) -> tuple[Market, ...]:
        """Markets this offer is priced in (an offer with only a spot price is spot-only)."""
        return tuple(m for m in MARKETS if self.price(m) is not None)

    @property
    def location(self) -> str:
        return f"{self.region}/{self.zone}" if self.zone else self.region

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class CloudSummary:
    """What was read for one cloud: where from, when, how many rows became offers and why others did not."""

    cloud: str
    path: str
    source: str
    date: str
    rows: int
    offers: int
    skipped: Mapping[str, int] = field(default_factory=dict)  # reason -> row count
    gpu_types: tuple[str, ...] = ()
    error: str | None = None  # the file could not be used at all

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["skipped"] = dict(self.skipped)
        d["gpu_types"] = list(self.gpu_types)
        return d


# One priced (offer, market) pair in placement order. The leading fields are the sort key: price, then more
# vCPUs and RAM first, on-demand before spot at the same price, then names, so the order is total and stable.
class RankEntry(NamedTuple):
    price: float
    neg_vcpus: float
    neg_memory_gb: float
    market_rank: int  # 0 = on-demand, 1 = spot
    cloud: str
    region: str
    zone: str
    instance_type: str
    offer: Offer
    market: Market
    key: OfferKey


def _entries(offers: Iterable[Offer]) -> tuple[RankEntry, ...]:
    out: list[RankEntry] = []
    for o in offers:
        for market, rank, price in ((ON_DEMAND, 0, o.price_ondemand), (SPOT, 1, o.price_spot)):
            if price is not None:
                out.append(
                    RankEntry(
                        price,
                        -(o.vcpus or 0.0),
                        -(o.memory_gb or 0.0),
                        rank,
                        o.cloud,
                        o.region,
                        o.zone or "",
                        o.instance_type,
                        o,
                        market,
                        OfferKey(o.cloud, o.region, o.zone, o.instance_type, o.gpu, o.gpu_count, market),
                    )
                )
    # The trailing Offer is never compared: the key fields before it identify an entry uniquely.
    out.sort(key=lambda e: e[:8])
    return tuple(out)


class OfferTable:
    """An immutable collection of offers, indexed for placement.

    >>> t = OfferTable([])
    >>> len(t), t.gpu_types()
    (0, ())
    """

    __slots__ = ("_by_count", "_by_gpu", "_by_gpu_count", "_ranked", "offers", "summaries")

    def __init__(self, offers: Iterable[Offer], summaries: Iterable[CloudSummary] = ()) -> None:
        self.offers: tuple[Offer, ...] = tuple(offers)
        self.summaries: tuple[CloudSummary, ...] = tuple(summaries)
        by_gpu: dict[str, list[Offer]] = {}
        for o in self.offers:
            lst = by_gpu.get(o.gpu)
            if lst is None:
                by_gpu[o.gpu] = [o]
            else:
                lst.append(o)
        self._by_gpu: dict[str, tuple[Offer, ...]] = {g: tuple(v) for g, v in by_gpu.items()}
        # Built on first use: a process that ranks one request pays only for the groups it touches.
        self._by_gpu_count: dict[tuple[str, int], tuple[Offer, ...]] = {}
        self._by_count: dict[int, tuple[Offer, ...]] = {}
        self._ranked: dict[tuple[str | None, int], tuple[RankEntry, ...]] = {}

    def __len__(self) -> int:
        return len(self.offers)

    def __iter__(self) -> Iterator[Offer]:
        return iter(self.offers)

    def __repr__(self) -> str:
        return f"OfferTable({len(self.offers)} offers, {len(self._by_gpu)} GPU types)"

    def gpu_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_gpu))

    def clouds(self) -> tuple[str, ...]:
        return tuple(sorted({o.cloud for o in self.offers}))

    def for_gpu(self, gpu: str) -> tuple[Offer, ...]:
        """All offers of one GPU type (canonical name), any count."""
        return self._by_gpu.get(gpu, ())

    def for_gpu_count(self, gpu: str, count: int) -> tuple[Offer, ...]:
        """Offers with exactly ``count`` GPUs of type ``gpu``."""
        k = (gpu, count)
        got = self._by_gpu_count.get(k)
        if got is None:
            got = self._by_gpu_count[k] = tuple(o for o in self.for_gpu(gpu) if o.gpu_count == count)
        return got

    def for_count(self, count: int) -> tuple[Offer, ...]:
        """Offers with exactly ``count`` GPUs of any type."""
        got = self._by_count.get(count)
        if got is None:
            got = self._by_count[count] = tuple(o for o in self.offers if o.gpu_count == count)
        return got

    def ranked(self, gpu: str | None, count: int) -> tuple[RankEntry, ...]:
        """Priced (offer, market) pairs with exactly ``count`` GPUs of ``gpu`` (None: any type), cheapest first."""
        k = (gpu, count)
        got = self._ranked.get(k)
        if got is None:
            offers = self.for_count(count) if gpu is None else self.for_gpu_count(gpu, count)
            got = self._ranked[k] = _entries(offers)
        return got
