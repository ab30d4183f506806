"""The rules the reconciler applies to a pool, as pure functions: no I/O, no clock, no database.

Inputs in, decisions out: the caller passes ``now``, the pool's workers as :class:`PoolWorker` rows, and the
in-memory policy state it owns (:class:`~cloudmodal.server.spot.PoolMarketState`,
:class:`~cloudmodal.server.spot.BlockList`, :class:`~cloudmodal.server.spot.StockoutLog`), which the
``record_*`` functions update as :class:`~cloudmodal.server.spot.MarketPolicy` does. The reconciler applies
the decisions through providers and the control plane; ``bench/autoscale_sim.py`` applies the same ones to
its simulated clouds.

- **Launch walk** (:func:`launch_walk`, :func:`launch_mode`, :func:`record_launch_failure`,
  :func:`record_launch_success`, :func:`launch_spacing`, :func:`launch_backoff`): one worker's launch tries
  placement's candidates in order, at most :data:`MAX_LAUNCH_TRIES`, skipping blocked ones, ranking again
  (with the blocks added meanwhile, and the market the spot policy allows then) when a list runs out; each
  failure blocks what it rules out. A walk that starts nothing backs the pool's launches off.
- **On-demand floor** (:func:`on_demand_floor`, :func:`on_demand_launches`): the pool's ``min_on_demand``
  cheapest (then oldest) live on-demand cloud workers, and how many launches must be forced on-demand.
- **Dispatch** (:func:`dispatch_price`, :func:`dispatch_key`): inputs go to the cheapest worker first; a
  floor worker counts as free (it is paid for whether it works or not).
- **Move back to spot** (:func:`move_back_to_spot`, :func:`settle_replacements`): a fallen-back pool probes
  spot with one extra worker; once spot works, on-demand workers above the floor are replaced by spot ones,
  one at a time, each drained only once its replacement is ready.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from typing import NamedTuple, TypeVar

from cloudmodal.placement import walk
from cloudmodal.pricing.offers import ON_DEMAND, SPOT, Offer, OfferKey
from cloudmodal.server.spot import (
    BlockList,
    MarketPolicy,
    PoolMarketState,
    SpotMode,
    StockoutClass,
    StockoutLog,
)
from cloudmodal.server.states import WorkerState

__all__ = [
    "LAUNCH_BACKOFF_S",
    "LAUNCH_SPACING_S",
    "MAX_LAUNCH_TRIES",
    "RANK_LIMIT",
    "LaunchFailure",
    "PoolWorker",
    "SpotMove",
    "dispatch_key",
    "dispatch_price",
    "launch_backoff",
    "launch_mode",
    "launch_spacing",
    "launch_walk",
    "move_back_to_spot",
    "on_demand_floor",
    "on_demand_launches",
    "record_launch_failure",
    "record_launch_success",
    "settle_replacements",
]

C = TypeVar("C")

MAX_LAUNCH_TRIES = 12  # candidates one worker's launch tries before the pool backs off
RANK_LIMIT = 12  # candidates per ranking (placement's ``limit=``)
# Between tries on one cloud in one walk: tries without a gap (an account's API request bucket takes a short
# burst, and a capacity error is answered at once), then the first gap, doubling up to the cap.
LAUNCH_SPACING_S = (3, 0.1, 1.0)
LAUNCH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after 1, 2, ... walks in a row that started nothing

_LIVE = (WorkerState.STARTING, WorkerState.READY)


class PoolWorker(NamedTuple):
    """What the rules need of one of a pool's workers (``cloud``: False for this machine's workers, which
    cost nothing and count neither for the on-demand floor nor for moves to spot)."""

    id: str
    state: str  # a WorkerState value
    market: str  # "spot" or "on-demand"
    price_per_hour: float
    started_at: float
    cloud: bool = True


# -- the launch walk ---------------------------------------------------------------------------------------
def launch_mode(
    requested: SpotMode,
    policy: MarketPolicy,
    state: PoolMarketState,
    now: float,
    *,
    on_demand: bool = False,
    spot_only: bool = False,
) -> SpotMode:
    """The ``PlacementPolicy(spot=...)`` of a ranking for a launch: "never" for a launch of the on-demand
    floor; "require" for a launch that only makes sense on spot (a probe of a fallen-back pool, a spot worker
    replacing an on-demand one: on demand it would be one more worker nobody asked for); else what the pool's
    spot policy allows now. A due probe is used by this call in both of the last two cases."""
    if on_demand:
        return "never"
    mode = policy.spot_mode(requested, state, now)
    return "require" if spot_only else mode


def launch_walk(
    ranked: Callable[[], Iterable[C]],
    key: Callable[[C], Hashable],
    blocked: Callable[[C], bool],
    max_tries: int = MAX_LAUNCH_TRIES,
) -> Iterator[C]:
    """The candidates one worker's launch tries, in order; the caller tries each and stops at a success.

    ``ranked()`` ranks afresh (it should call :func:`launch_mode` and pass the active blocks to placement);
    it is called again whenever a list runs out, so blocks added by this walk's failures, or a concurrent
    walk's, move the launch on to the next tier or market. ``blocked(c)`` is asked just before ``c`` is
    yielded (a class blocked meanwhile is skipped without a try); ``key(c)`` names what is tried at most once.
    See :func:`cloudmodal.placement.walk`.
    """
    return walk(ranked, key, blocked, max_tries)


def launch_spacing(failures_here: int) -> float:
    """Seconds to wait before the next try on a cloud where this walk already failed ``failures_here``
    times (clouds rate-limit launches per account): none for the first few, then doubling up to a cap."""
    free, first, cap = LAUNCH_SPACING_S
    if failures_here <= free:
        return 0.0
    return float(min(first * 2 ** (failures_here - free - 1), cap))


def launch_backoff(failed_walks: int) -> float:
    """Seconds a pool waits before launching again after ``failed_walks`` (≥ 1) walks in a row that started
    nothing."""
    return LAUNCH_BACKOFF_S[min(max(failed_walks, 1) - 1, len(LAUNCH_BACKOFF_S) - 1)]


class LaunchFailure(NamedTuple):
    """What :func:`record_launch_failure` changed: until when the offer is blocked (None without an offer),
    the classes now blocked as ``(class, until, reason)``, and the ``pool.spot_fallback`` message when the
    pool fell back to on-demand."""

    until: float | None
    classes: list[tuple[StockoutClass, float, str]]
    spot_fallback: str | None


def record_launch_failure(
    policy: MarketPolicy,
    blocks: BlockList,
    state: PoolMarketState,
    key: OfferKey | None,
    market: str,
    now: float,
    reason: str,
    *,
    quota: bool = False,
    capacity: bool = False,
    quota_offers: Iterable[Offer] = (),
    stockouts: StockoutLog | None = None,
    class_offers: Iterable[Offer] = (),
) -> LaunchFailure:
    """A launch of ``key`` in ``market`` failed. Blocks the offer (``quota``: every offer of
    ``quota_offers`` in its quota scope), counts a ``capacity`` failure against its class in ``stockouts``
    (blocking the class's offers among ``class_offers`` when enough failed; skipped when ``stockouts`` is
    None), and counts a spot failure against the pool's market ``state``. ``key`` None (a provider without
    offers): only the spot failure is counted. ``reason`` is what the block entries say."""
    until: float | None = None
    classes: list[tuple[StockoutClass, float, str]] = []
    if key is not None:
        until = policy.block_failed_launch(
            blocks, key, now, reason, quota=quota, offers=quota_offers if quota else ()
        )
        if capacity and stockouts is not None:
            classes = policy.record_stockout(stockouts, blocks, key, now, class_offers)
    fallback = policy.record_spot_failure(state, now) if market == SPOT else None
    return LaunchFailure(until, classes, fallback)


def record_launch_success(
    policy: MarketPolicy,
    state: PoolMarketState,
    key: OfferKey | None,
    market: str,
    now: float,
    *,
    stockouts: StockoutLog | None = None,
) -> str | None:
    """A launch of ``key`` in ``market`` succeeded: its class's stockouts stop counting, and a spot success
    may end the pool's fallback. Returns the ``pool.spot_restored`` message when it does."""
    if key is not None and stockouts is not None:
        policy.record_launch_success(stockouts, key)
    return policy.record_spot_success(state, now) if market == SPOT else None


# -- the on-demand floor and dispatch ----------------------------------------------------------------------
def on_demand_floor(min_on_demand: int, workers: Iterable[PoolWorker]) -> frozenset[str]:
    """The ids of the pool's ``min_on_demand`` floor: its cheapest, then oldest, starting or ready on-demand
    cloud workers. The autoscaler stops them last and dispatch hands them inputs first."""
    if min_on_demand <= 0:
        return frozenset()
    od = sorted(
        (w for w in workers if w.market == ON_DEMAND and w.cloud and w.state in _LIVE),
        key=lambda w: (w.price_per_hour, w.started_at),
    )
    return frozenset(w.id for w in od[:min_on_demand])


def on_demand_launches(
    policy: MarketPolicy, min_on_demand: int, workers: Iterable[PoolWorker], launching_on_demand: int = 0
) -> int:
    """How many of the next launches must be on-demand to keep ``min_on_demand``: the floor minus the live
    (not draining) on-demand cloud workers and the forced on-demand launches still on their way."""
    live = sum(1 for w in workers if w.market == ON_DEMAND and w.cloud and w.state != WorkerState.DRAINING)
    return policy.on_demand_floor(min_on_demand, live + launching_on_demand)


def dispatch_price(price_per_hour: float, on_floor: bool) -> float:
    """What handing a worker inputs costs, for dispatch: its price, or 0 for a worker of the on-demand floor
    (kept, and paid, whether it works or not). The cheapest is handed inputs first."""
    return 0.0 if on_floor else price_per_hour


def dispatch_key(price_per_hour: float, on_floor: bool, since: float) -> tuple[float, float]:
    """Sort key of dispatch's order: cheapest first (:func:`dispatch_price`), then by ``since``."""
    return (dispatch_price(price_per_hour, on_floor), since)


# -- back to spot -----------------------------------------------------------------------------------------
class SpotMove(NamedTuple):
    """What :func:`move_back_to_spot` decided: launch one spot probe, and/or replace these on-demand
    workers (launch one spot worker for each, and drain it once that is ready)."""

    probe: bool = False
    replace: tuple[str, ...] = ()


def move_back_to_spot(
    policy: MarketPolicy,
    state: PoolMarketState,
    workers: Iterable[PoolWorker],
    min_on_demand: int,
    spot_price: Callable[[], float | None],
    now: float,
    *,
    leaving: Collection[str] = (),
) -> SpotMove:
    """For a ``spot="allow"`` pool with live on-demand cloud workers, launching nothing else this tick: while
    fallen back, a probe when one is due (the probe launch's :func:`launch_mode` grants spot); else the
    on-demand workers to replace by spot (:meth:`MarketPolicy.to_replace`: most expensive above the floor,
    one at a time, when spot is cheap enough). ``spot_price()`` is the cheapest spot candidate's $/h now
    (None: none), asked only when needed; ``leaving``: workers whose replacement is already on its way."""
    live = [w for w in workers if w.state != WorkerState.DRAINING and w.cloud]
    if not any(w.market == ON_DEMAND for w in live):
        return SpotMove()
    if state.fallen_back:
        return SpotMove(probe=policy.probe_due(state, now))
    price = spot_price()
    if price is None:
        return SpotMove()
    ids = policy.to_replace(
        state,
        [(w.id, w.market, w.price_per_hour) for w in live if w.id not in leaving],
        min_on_demand,
        price,
        now,
    )
    return SpotMove(replace=tuple(ids))


def settle_replacements(
    replacing: Mapping[str, str],
    workers: Mapping[str, PoolWorker],
    state_of: Callable[[str], str | None],
) -> tuple[list[tuple[str, str]], list[str]]:
    """Which spot replacements (``replacing``: replacement id -> the on-demand worker it replaces) are done.

    Returns ``(drain, done)``: ``drain`` the ``(replacement, old)`` pairs whose replacement came up ready on
    spot while the old worker still runs (drain the old one now, not before: the pool would be short while
    the replacement boots); ``done`` every replacement to forget (drained, failed, stopped, or up on demand;
    the old worker then stays). ``workers``: the pool's live workers by id; ``state_of(id)``: the state of a
    replacement not among them (None: unknown)."""
    drain: list[tuple[str, str]] = []
    done: list[str] = []
    for new, old in replacing.items():
        w = workers.get(new)
        state = w.state if w is not None else state_of(new)
        if state == WorkerState.STARTING:
            continue
        done.append(new)
        o = workers.get(old)
        if state != WorkerState.READY or w is None or w.market != SPOT or o is None:
            continue
        if o.state in _LIVE:
            drain.append((new, old))
    return drain, done
