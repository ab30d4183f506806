"""The sim provider: a simulated cloud for end-to-end tests and benchmarks.

It serves every offer of a real price catalog (aws, gcp, azure, lambda, runpod...) as if each were a cloud, and
each launch starts a REAL local worker process (through :class:`~cloudmodal.providers.local.LocalProvider`), so
the control plane, the queue and the workers run exactly as they do on a cloud. What a cloud does to a
launch is scripted by a :class:`~cloudmodal.providers.sim_scenario.SimScenario`:

- **provisioning delays**: a launch returns at once with a handle in state ``"provisioning"``; the worker
  process starts after the delay (a background thread starts it; so does any ``describe``/``poll`` that
  finds it due);
- **capacity errors** (:class:`NoCapacityError`) per offer, zone or market, always or with a probability,
  within time windows ("no spot capacity for p5.48xlarge between t=10 s and t=40 s");
- **quota errors** (:class:`QuotaExceededError`): a cap on live GPUs (or instances) per cloud, region, GPU
  type... whatever the rule's ``match`` and ``per`` say;
- **spot preemptions**: a spot worker first gets a notice (:meth:`SimProvider.preemption_notice` returns the
  reclaim time), then after ``notice_s`` its process group is SIGKILLed and ``describe`` says
  ``"preempted"``. Per worker (``every_s`` ± ``jitter_s`` after it starts running, or at a rate), fleet-wide
  (one running spot worker every ``every_s``, or at explicit times), or on demand (:meth:`SimProvider.preempt`).

Time in a scenario is seconds since the provider was created (``clock()`` at construction). Randomness is
seeded and never global: the n-th draw for a given purpose and offer (the jitter of the n-th launch of
``aws:p5.48xlarge:spot``, say) is the same in every run with the same seed, whatever the worker ids and however
launches on different offers interleave.

A scenario (its schema and an example: :mod:`cloudmodal.providers.sim_scenario`) comes from a dict, a JSON
or TOML file, or the environment (:meth:`SimProvider.from_env`: ``CLOUDMODAL_SIM_SCENARIO`` is a path or
inline JSON, ``CLOUDMODAL_SIM_SEED`` an integer).

Workers see no GPU (``CUDA_VISIBLE_DEVICES=""``): the machines are simulated. Each gets
``CLOUDMODAL_SIM_OFFER`` (the offer key), ``CLOUDMODAL_SIM_MARKET`` and ``CLOUDMODAL_SIM_NOTICE_FILE``, a path
that is written (JSON ``{"reclaim_at": ...}``) when its preemption notice arrives, as a cloud's metadata
endpoint would announce it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cloudmodal.config import cache_dir, open_private, private_dir
from cloudmodal.pricing.offers import MARKETS, OfferKey, OfferTable
from cloudmodal.providers.base import (
    LaunchRequest,
    Market,
    NoCapacityError,
    Provider,
    ProviderError,
    QuotaExceededError,
    Signal,
    SupportsPreemptionNotice,
    SupportsSignals,
    WorkerHandle,
    WorkerStatus,
)
from cloudmodal.providers.envs import resolve_python
from cloudmodal.providers.local import LocalProvider
from cloudmodal.providers.sim_scenario import (
    CAPACITY_MODES,
    MATCH_FIELDS,
    PREEMPTION_SCOPES,
    QUOTA_PER_FIELDS,
    SCENARIO_ENV,
    CapacityRule,
    DelayRule,
    Match,
    PreemptionRule,
    Provisioning,
    QuotaRule,
    SimScenario,
)

__all__ = [
    "CAPACITY_MODES",
    "MATCH_FIELDS",
    "NOTICE_FILE_ENV",
    "PREEMPTION_SCOPES",
    "QUOTA_PER_FIELDS",
    "SCENARIO_ENV",
    "SEED_ENV",
    "CapacityRule",
    "DelayRule",
    "Match",
    "PreemptionRule",
    "Provisioning",
    "QuotaRule",
    "SimProvider",
    "SimScenario",
]

log = logging.getLogger(__name__)

SEED_ENV = "CLOUDMODAL_SIM_SEED"
NOTICE_FILE_ENV = "CLOUDMODAL_SIM_NOTICE_FILE"

# The reason codes the real clouds give, so events read as they would in production.
_CAPACITY_REASONS = {
    "aws": "InsufficientInstanceCapacity",
    "gcp": "ZONE_RESOURCE_POOL_EXHAUSTED",
    "azure": "AllocationFailed",
    "lambda": "insufficient-capacity",
}
_QUOTA_REASONS = {
    "aws": "VcpuLimitExceeded",
    "gcp": "QUOTA_EXCEEDED",
    "azure": "OperationNotAllowed",
    "lambda": "quota-exceeded",
}

_REAP_EVERY_S = 0.25  # how often poll() looks for worker processes that exited on their own


def _in_window(t: float, from_s: float | None, until_s: float | None) -> bool:
    return (from_s is None or t >= from_s) and (until_s is None or t < until_s)


# --- the provider -------------------------------------------------------------------------------------------


def _offer_key(offer: Any, market: str) -> OfferKey:
    key = getattr(offer, "key", None)
    if callable(key):
        return key(market)
    return OfferKey(
        offer.cloud, offer.region, offer.zone, offer.instance_type, offer.gpu or "", offer.gpu_count, market
    )


def _price(offer: Any, market: str) -> float | None:
    return offer.price_spot if market == "spot" else offer.price_ondemand


def _where(offer: Any) -> str:
    return f"{offer.region}/{offer.zone}" if getattr(offer, "zone", None) else offer.region


def _offer_text(offer: Any) -> str:
    return f"{offer.instance_type} ({offer.gpu_count}x {offer.gpu}) in {offer.cloud} {_where(offer)}"


@dataclass
class _Worker:
    worker_id: str
    serial: int
    req: LaunchRequest  # what the local provider is asked to start (no GPU: the machine is simulated)
    offer: Any
    market: Market
    key: OfferKey
    launched_at: float
    ready_at: float
    state: str = "provisioning"  # provisioning | running | preempted | exited
    inner: WorkerHandle | None = None  # the local provider's handle, once the process started
    starting: bool = False
    terminating: bool = False
    reaped: bool = False
    returncode: int | None = None
    detail: str = ""
    running_at: float | None = None
    notice_at: float | None = None
    reclaim_at: float | None = None
    notice_s: float | None = None
    notice_reason: str = ""
    notice_file: Path | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("provisioning", "running")

    @property
    def pid(self) -> int | None:
        return self.inner.extra.get("pid") if self.inner is not None else None


class SimProvider(Provider, SupportsSignals, SupportsPreemptionNotice):
    """A simulated cloud: catalog offers, real local worker processes, scripted capacity, quota and preemptions.

    ``offers``: what it sells (default: :func:`cloudmodal.pricing.catalog.load_offer_table`, every cloud in
    the catalog). ``scenario``: what its clouds do (a :class:`SimScenario`, or anything
    :meth:`SimScenario.load` takes; default: no delays, no failures). ``seed``: for every random draw.
    ``clock``/``sleep``: the time source and how the background thread waits between polls; with
    ``background=False`` there is no thread and time moves only when :meth:`poll` (or ``launch``,
    ``describe``, ``preemption_notice``) is called, which makes tests with a fake clock exact.

    >>> with SimProvider(offers=[], scenario={"notice_s": 5}) as sim:  # doctest: +SKIP
    ...     handle = sim.launch(LaunchRequest(..., offer=offer, market="spot"))
    ...     sim.preempt(handle.worker_id)
    """

    name = "sim"

    def __init__(
        self,
        *,
        offers: OfferTable | Iterable[Any] | None = None,
        scenario: SimScenario | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = time.sleep,
        background: bool = True,
        tick_s: float = 0.02,
    ) -> None:
        if offers is None:
            from cloudmodal.pricing.catalog import load_offer_table

            offers = load_offer_table()
        self.offer_table = offers if isinstance(offers, OfferTable) else OfferTable(offers)
        self.scenario = SimScenario() if scenario is None else SimScenario.load(scenario)
        self.seed = int(seed)
        self.state_dir = Path(state_dir) if state_dir is not None else cache_dir() / "sim"
        self._clock = clock
        self._sleep = sleep
        self._background = background
        self._tick_s = tick_s
        self.started_at = clock()
        self._local = LocalProvider(state_dir=self.state_dir, gpus=[], clock=clock)
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._events: list[
            tuple[float, int, str, str, int, Any]
        ] = []  # (at, seq, kind, worker id, serial, data)
        self._seq = itertools.count()
        self._serials = itertools.count(1)
        self._draws: dict[tuple[Any, ...], int] = {}
        self._overrides: list[tuple[Match, bool]] = []  # set_capacity(), newest last
        self._notice_files: list[tuple[Path, dict[str, Any]]] = []  # written outside the lock
        self._next_reap = 0.0
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for i, rule in enumerate(self.scenario.preemption):
            if rule.scope == "fleet":
                if rule.at_s:
                    for t in rule.at_s:
                        self._push(self.started_at + t, "fleet", "", 0, i)
                else:
                    self._schedule_fleet(i, rule.from_s or 0.0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> SimProvider:
        """A provider configured by ``CLOUDMODAL_SIM_SCENARIO`` (a JSON/TOML path, or inline JSON) and
        ``CLOUDMODAL_SIM_SEED``; ``kwargs`` go to the constructor (they win over the environment)."""
        from cloudmodal.settings import settings

        s = settings(environ)
        raw = (s.sim_scenario or "").strip()
        if raw and "scenario" not in kwargs:
            kwargs["scenario"] = SimScenario.load(raw)
        if s.sim_seed is not None and "seed" not in kwargs:
            kwargs["seed"] = s.sim_seed
        return cls(**kwargs)

    # --- time and randomness (callers hold the lock) --------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since this provider was created: the time scenario rules are written in."""
        return self._clock() - self.started_at

    def _rng(self, *purpose: Any) -> random.Random:
        """The generator for the next draw of ``purpose``: the n-th draw of a purpose is the same in every run."""
        n = self._draws.get(purpose, 0)
        self._draws[purpose] = n + 1
        return random.Random(f"{self.seed}|{'|'.join(map(str, purpose))}|{n}")

    def _push(self, at: float, kind: str, worker_id: str, serial: int, data: Any = None) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, worker_id, serial, data))

    def _schedule_fleet(self, index: int, after_s: float) -> None:
        rule = self.scenario.preemption[index]
        t = after_s + rule.interval(self._rng("preempt-fleet", index))
        if rule.until_s is None or t < rule.until_s:
            self._push(self.started_at + t, "fleet", "", 0, index)

    # --- offers and signals -------------------------------------------------------------------------------

    def offers(self) -> list[Any]:
        """Every catalog offer: each cloud of the catalog is a simulated cloud."""
        return list(self.offer_table.offers)

    def signals(self) -> list[Signal]:
        """Offers the scenario rules out now, for placement to skip: no capacity in every market the offer is
        sold in (a ``"none"`` rule or :meth:`set_capacity`), or too little quota left for one more.

        A spot-only outage gives no signal (a :class:`Signal` has no market); placement learns it from the
        failed launch, as with a real cloud. Probabilistic (``fail_prob``) rules give none either."""
        self.poll()
        now = self._clock()
        t = now - self.started_at
        with self._lock:
            if not self.scenario.signals:
                return []
            if (
                not self._overrides
                and not self.scenario.quota
                and not any(r.mode == "none" or r.p >= 1.0 for r in self.scenario.capacity)
            ):
                return []
            usage = self._quota_usage()
            out: list[Signal] = []
            for o in self.offer_table.offers:
                markets = [m for m in MARKETS if _price(o, m) is not None]
                down = [why for m in markets if (why := self._outage(o, m, t)) is not None]
                sig: dict[str, Any] | None = None
                if markets and len(down) == len(markets):
                    sig = {"available": False, "detail": f"sim: no capacity ({down[0]})"}
                else:
                    left = self._quota_left(o, usage)
                    if left is not None and left < o.gpu_count:
                        sig = {"quota_left_gpus": left, "detail": f"sim: quota allows {left} more GPU(s)"}
                if sig is not None:
                    out.append(
                        Signal(
                            cloud=o.cloud, region=o.region, zone=o.zone, instance_type=o.instance_type, gpu=o.gpu,
                            price_spot=o.price_spot, price_ondemand=o.price_ondemand, observed_at=now, **sig,
                        )
                    )  # fmt: skip
            return out

    # --- capacity, quota, delays (callers hold the lock) ---------------------------------------------------

    def set_capacity(self, match: Match | Mapping[str, Any] | None, available: bool) -> None:
        """From now on, matching offers have (``True``) or lack (``False``) capacity, whatever the scenario's
        capacity rules say; the latest matching call wins. ``match=None`` is every offer."""
        m = match if isinstance(match, Match) else Match.from_dict(match)
        with self._lock:
            self._overrides = [(old, a) for old, a in self._overrides if old != m]
            self._overrides.append((m, bool(available)))

    def clear_capacity(self) -> None:
        """Forget every :meth:`set_capacity`: the scenario's rules alone decide again."""
        with self._lock:
            self._overrides.clear()

    def _override(self, offer: Any, market: str) -> bool | None:
        for m, available in reversed(self._overrides):
            if m.matches(offer, market):
                return available
        return None

    def _outage(self, offer: Any, market: str, t: float) -> str | None:
        """Why the offer certainly has no capacity now (no random draw), or None."""
        override = self._override(offer, market)
        if override is not None:
            return None if override else "set_capacity"
        for i, rule in enumerate(self.scenario.capacity):
            if (
                (rule.mode == "none" or rule.p >= 1.0)
                and rule.active(t)
                and rule.match.matches(offer, market)
            ):
                return f"capacity rule {i}"
        return None

    def _check_capacity(self, offer: Any, market: str, key: OfferKey, t: float) -> None:
        override = self._override(offer, market)
        why = None
        reason = None
        if override is False:
            why = "capacity switched off by set_capacity()"
        elif override is None:
            for i, rule in enumerate(self.scenario.capacity):
                if not (rule.active(t) and rule.match.matches(offer, market)):
                    continue
                if rule.mode == "none" or self._rng("capacity", i, key).random() < rule.p:
                    window = ""
                    if rule.from_s is not None or rule.until_s is not None:
                        window = f" from t={rule.from_s or 0:g} s" + (
                            f" until t={rule.until_s:g} s" if rule.until_s is not None else ""
                        )
                    chance = f" (p={rule.p:g})" if rule.mode == "fail_prob" else ""
                    why = f"scenario capacity rule {i}: {rule.mode}{chance}{window}"
                    reason = rule.reason
                    break
        if why is not None:
            raise NoCapacityError(
                f"{offer.cloud} has no {market} capacity for {_offer_text(offer)} right now (simulated; {why}). "
                "Try another offer, zone or market; capacity may come back later.",
                offer=offer,
                reason=reason or _CAPACITY_REASONS.get(offer.cloud, "InsufficientCapacity"),
            )

    def _quota_usage(self) -> dict[tuple[int, tuple[Any, ...]], list[int]]:
        """``{(rule index, bucket): [live GPUs, live instances]}``."""
        usage: dict[tuple[int, tuple[Any, ...]], list[int]] = {}
        rules = self.scenario.quota
        if not rules:
            return usage
        for w in self._workers.values():
            if not w.alive:
                continue
            for i, rule in enumerate(rules):
                if rule.match.matches(w.offer, w.market):
                    u = usage.setdefault((i, rule.bucket(w.offer, w.market)), [0, 0])
                    u[0] += w.offer.gpu_count
                    u[1] += 1
        return usage

    def _quota_left(self, offer: Any, usage: Mapping[tuple[int, tuple[Any, ...]], list[int]]) -> int | None:
        """GPUs the quota still allows for one offer in every market (rules about one market are skipped)."""
        left: int | None = None
        for i, rule in enumerate(self.scenario.quota):
            if rule.match.market is not None or "market" in rule.per:
                continue
            if not any(rule.match.matches(offer, m) for m in MARKETS):
                continue
            gpus, instances = usage.get((i, rule.bucket(offer, "")), (0, 0))
            n = rule.max_gpus - gpus if rule.max_gpus is not None else None
            if rule.max_instances is not None and instances >= rule.max_instances:
                n = 0
            if n is not None:
                left = max(n, 0) if left is None else min(left, max(n, 0))
        return left

    def _check_quota(self, offer: Any, market: str) -> None:
        usage = self._quota_usage()
        for i, rule in enumerate(self.scenario.quota):
            if not rule.match.matches(offer, market):
                continue
            bucket = rule.bucket(offer, market)
            gpus, instances = usage.get((i, bucket), (0, 0))
            scope = ", ".join(f"{f}={v}" for f, v in zip(rule.per, bucket, strict=True))
            scope = f" ({scope})" if scope else ""
            over = None
            if rule.max_gpus is not None and gpus + offer.gpu_count > rule.max_gpus:
                over = (
                    f"{gpus} of {rule.max_gpus} GPUs in use{scope}, this launch needs {offer.gpu_count} more"
                )
            elif rule.max_instances is not None and instances + 1 > rule.max_instances:
                over = f"{instances} of {rule.max_instances} instances in use{scope}"
            if over is not None:
                raise QuotaExceededError(
                    f"{offer.cloud} quota exceeded for {_offer_text(offer)}: {over} (simulated; scenario quota "
                    f"rule {i}). Stop other workers, pick another cloud or region, or raise the quota.",
                    offer=offer,
                    reason=_QUOTA_REASONS.get(offer.cloud, "QuotaExceeded"),
                )

    def _provisioning_delay(self, offer: Any, market: str, key: OfferKey) -> float:
        delay, jitter = self.scenario.provisioning.rule_for(offer, market)
        if jitter:
            delay += self._rng("delay", key).uniform(-jitter, jitter)
        return max(0.0, delay)

    # --- lifecycle ----------------------------------------------------------------------------------------

    def launch(self, req: LaunchRequest) -> WorkerHandle:
        offer, market = req.offer, req.market
        if offer is None:
            raise ProviderError(
                f"The sim provider launches catalog offers, and worker {req.worker_id}'s request has none: pass "
                "LaunchRequest.offer (one of SimProvider.offers()) and a market.",
                reason="no-offer",
            )
        if market not in MARKETS:
            raise ProviderError(
                f"Unknown market {market!r}; use one of {', '.join(MARKETS)}.",
                offer=offer,
                reason="bad-market",
            )
        price = _price(offer, market)
        if price is None:
            other = "on-demand" if market == "spot" else "spot"
            raise ProviderError(
                f"{_offer_text(offer)} is not sold as {market} (the catalog has no {market} price for it). "
                f"Launch it {other}, or pick an offer with a {market} price.",
                offer=offer,
                reason="no-spot-price" if market == "spot" else "no-on-demand-price",
            )
        # Build (or find) the image's environment here, in the caller's thread, so the delayed start is a
        # plain process spawn and a broken image fails this launch with ImageBuildError.
        resolve_python(req.pip_packages, req.image_hash)
        self.poll()
        now = self._clock()
        key = _offer_key(offer, market)
        notice_file = self.state_dir / "notices" / f"{req.worker_id}.json"
        env = dict(req.env)
        env.update(
            {
                NOTICE_FILE_ENV: str(notice_file),
                "CLOUDMODAL_SIM_OFFER": str(key),
                "CLOUDMODAL_SIM_MARKET": market,
            }
        )
        inner_req = replace(req, gpu=None, env=env)
        with self._lock:
            if self._closed:
                raise ProviderError(
                    "This sim provider is closed; create a new one.", offer=offer, reason="closed"
                )
            old = self._workers.get(req.worker_id)
            if old is not None and old.alive:
                raise ProviderError(
                    f"Worker {req.worker_id} is already running on the sim provider; use a new worker id.",
                    offer=offer,
                    reason="duplicate-worker-id",
                )
            self._check_quota(offer, market)
            self._check_capacity(offer, market, key, now - self.started_at)
            delay = self._provisioning_delay(offer, market, key)
            w = _Worker(
                worker_id=req.worker_id, serial=next(self._serials), req=inner_req, offer=offer, market=market,
                key=key, launched_at=now, ready_at=now + delay, notice_file=notice_file,
            )  # fmt: skip
            self._workers[req.worker_id] = w
            if delay > 0:
                self._push(w.ready_at, "start", w.worker_id, w.serial)
            else:
                w.starting = True
        try:
            notice_file.unlink(missing_ok=True)  # from an earlier worker with this id
        except OSError:
            pass
        handle = WorkerHandle(
            worker_id=req.worker_id,
            provider=self.name,
            instance_id=f"sim-{offer.cloud}-{w.serial:06d}",
            offer=offer,
            market=market,
            price_per_hour=float(price),
            launched_at=now,
            extra={
                "serial": w.serial,
                "cloud": offer.cloud,
                "offer_key": str(key),
                "provisioning_s": round(delay, 6),
                "ready_at": w.ready_at,
                "log_path": str(self.state_dir / "logs" / f"{req.worker_id}.log"),
                "notice_file": str(notice_file),
            },
        )
        if delay <= 0:
            self._start(w, raise_errors=True)  # like the local provider: the process runs when launch returns
        self._ensure_thread()  # starts, notices and reclaims happen on time even if nobody asks
        return handle

    def _ensure_thread(self) -> None:
        if not self._background:
            return
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="sim-provider", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # the simulation must keep running; the error is a bug to report
                log.exception("sim provider poll failed")
            self._sleep(self._tick_s)

    def _start(self, w: _Worker, *, raise_errors: bool = False) -> None:
        """Start the worker's process (outside the lock); the caller marked it ``starting``."""
        try:
            inner = self._local.launch(w.req)
        except ProviderError as e:
            with self._lock:
                if w.state == "provisioning":
                    w.state, w.detail = "exited", f"the worker process could not start: {e}"
                w.starting = False
            if raise_errors:
                raise
            log.warning("sim worker %s could not start: %s", w.worker_id, e)
            return
        kill = False
        with self._lock:
            w.inner, w.starting = inner, False
            if w.state == "provisioning" and not self._closed and self._workers.get(w.worker_id) is w:
                w.state = "running"
                w.running_at = self._clock()
                self._schedule_worker_preemption(w)
            else:
                kill = True  # terminated, preempted or closed while it was starting
        if kill:
            self._kill_group(inner)
            self._local.terminate(inner, grace_s=0.0)  # reaps it
            with self._lock:
                w.reaped = True

    def _schedule_worker_preemption(self, w: _Worker) -> None:
        if w.market != "spot" or w.running_at is None:
            return
        started = w.running_at - self.started_at
        best: tuple[float, int] | None = None
        for i, rule in enumerate(self.scenario.preemption):
            if rule.scope != "worker" or not rule.match.matches(w.offer, "spot"):
                continue
            t = max(started, rule.from_s or 0.0) + rule.interval(self._rng("preempt", i, w.key))
            if rule.until_s is not None and t >= rule.until_s:
                continue
            if best is None or t < best[0]:
                best = (t, i)
        if best is not None:
            t, i = best
            rule = self.scenario.preemption[i]
            why = f"{rule.reason or 'spot capacity reclaimed'}; preemption rule {i}: {rule.describe()}"
            self._push(self.started_at + t, "notice", w.worker_id, w.serial, (rule.notice_s, why))

    def _give_notice(self, w: _Worker, at: float, notice_s: float | None, why: str) -> float:
        notice_s = self.scenario.notice_s if notice_s is None else max(0.0, notice_s)
        reclaim_at = at + notice_s
        if w.reclaim_at is not None and w.reclaim_at <= reclaim_at:
            return w.reclaim_at  # an earlier notice stands
        w.notice_at, w.reclaim_at, w.notice_s, w.notice_reason = at, reclaim_at, notice_s, why
        self._push(reclaim_at, "reclaim", w.worker_id, w.serial)
        if w.notice_file is not None:
            self._notice_files.append(
                (w.notice_file, {"reclaim_at": reclaim_at, "notice_s": notice_s, "reason": why})
            )
        return reclaim_at

    def _reclaim(self, w: _Worker) -> None:
        w.state = "preempted"
        w.detail = (
            f"{w.offer.cloud} reclaimed the spot instance {_offer_text(w.offer)} (simulated; {w.notice_reason}; "
            f"notice given {w.notice_s or 0:g} s before)"
        )
        if w.inner is not None and not w.terminating and not w.reaped:
            self._kill_group(w.inner)

    def _fire_fleet(self, index: int, at: float) -> None:
        rule = self.scenario.preemption[index]
        eligible = sorted(
            (
                w
                for w in self._workers.values()
                if w.state == "running" and w.market == "spot" and w.reclaim_at is None
            ),
            key=lambda w: w.worker_id,
        )
        eligible = [w for w in eligible if rule.match.matches(w.offer, "spot")]
        if eligible and _in_window(at - self.started_at, rule.from_s, rule.until_s):
            w = self._rng("preempt-fleet-victim", index).choice(eligible)
            why = f"{rule.reason or 'spot capacity reclaimed'}; preemption rule {index}: {rule.describe()}"
            self._give_notice(w, at, rule.notice_s, why)
        if not rule.at_s:
            self._schedule_fleet(index, at - self.started_at)

    @staticmethod
    def _kill_group(inner: WorkerHandle) -> None:
        pid = inner.extra.get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)  # the worker leads its own process group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass

    def _refresh(self, w: _Worker) -> None:
        """Reap the worker's process if it is gone (caller holds the lock; never while terminate runs)."""
        if w.inner is None or w.reaped or w.terminating:
            return
        st = self._local.describe(w.inner)
        if st.state == "running":
            return
        w.reaped = True
        w.returncode = st.returncode
        if w.state == "running":
            w.state, w.detail = "exited", st.detail

    def poll(self) -> None:
        """Apply everything due by ``clock()``: start provisioned workers, give notices, reclaim, reap."""
        now = self._clock()
        starts: list[_Worker] = []
        with self._lock:
            while self._events and self._events[0][0] <= now:
                at, _, kind, worker_id, serial, data = heapq.heappop(self._events)
                if kind == "fleet":
                    if not self._closed:
                        self._fire_fleet(data, at)
                    continue
                w = self._workers.get(worker_id)
                if w is None or w.serial != serial or not w.alive:
                    continue
                if kind == "start":
                    if w.inner is None and not w.starting and not self._closed:
                        w.starting = True
                        starts.append(w)
                elif kind == "notice":
                    notice_s, why = data
                    self._give_notice(w, at, notice_s, why)
                elif kind == "reclaim" and w.reclaim_at is not None and w.reclaim_at <= at:
                    self._reclaim(w)
            if now >= self._next_reap:
                self._next_reap = now + _REAP_EVERY_S
                for w in self._workers.values():
                    self._refresh(w)
            files, self._notice_files = self._notice_files, []
        self._write_notices(files)
        for w in starts:
            self._start(w)

    @staticmethod
    def _write_notices(files: list[tuple[Path, dict[str, Any]]]) -> None:
        for path, payload in files:
            try:
                private_dir(path.parent.parent)  # the sim's state directory, then its notices/
                private_dir(path.parent)
                tmp = path.with_suffix(".tmp")
                with open_private(tmp, "w", encoding="utf-8") as f:
                    f.write(json.dumps(payload) + "\n")
                os.replace(tmp, path)  # a watching worker never reads half a notice
            except OSError as e:
                log.warning("could not write the preemption notice %s: %s", path, e)

    def _find(self, handle: WorkerHandle) -> _Worker | None:
        w = self._workers.get(handle.worker_id)
        if w is None or handle.extra.get("serial", w.serial) != w.serial:
            return None
        return w

    def describe(self, handle: WorkerHandle) -> WorkerStatus:
        self.poll()
        now = self._clock()
        with self._lock:
            w = self._find(handle)
            if w is None:
                return WorkerStatus(
                    "unknown",
                    None,
                    f"worker {handle.worker_id} was not launched by this sim provider instance",
                )
            self._refresh(w)
            if w.state == "provisioning":
                left = max(0.0, w.ready_at - now)
                return WorkerStatus(
                    "provisioning", None, f"provisioning {_offer_text(w.offer)} ({left:.1f} s left)"
                )
            if w.state == "running":
                detail = f"pid {w.pid} on simulated {_offer_text(w.offer)} ({w.market})"
                if w.reclaim_at is not None:
                    detail += f"; preemption notice: reclaimed in {max(0.0, w.reclaim_at - now):.1f} s"
                return WorkerStatus("running", None, detail)
            return WorkerStatus(w.state, w.returncode, w.detail)

    def preemption_notice(self, handle: WorkerHandle) -> float | None:
        self.poll()
        with self._lock:
            w = self._find(handle)
            if w is None or not w.alive:
                return None
            return w.reclaim_at

    def preempt(
        self, worker: str | WorkerHandle, notice_s: float | None = None, *, reason: str = "preempt() called"
    ) -> float | None:
        """Give a spot worker its preemption notice now; it is SIGKILLed ``notice_s`` later (default: the
        scenario's ``notice_s``; 0 reclaims it at once). Returns the reclaim time (epoch seconds), or None
        when the worker is no longer alive. Raises :class:`ProviderError` for an unknown or on-demand worker."""
        worker_id = worker.worker_id if isinstance(worker, WorkerHandle) else worker
        now = self._clock()
        with self._lock:
            w = self._workers.get(worker_id)
            if w is None:
                raise ProviderError(f"No worker {worker_id} on this sim provider.", reason="unknown-worker")
            if w.market != "spot":
                raise ProviderError(
                    f"Worker {worker_id} runs on-demand; only spot workers are preempted.",
                    offer=w.offer,
                    reason="not-spot",
                )
            if not w.alive:
                return None
            reclaim_at = self._give_notice(w, now, notice_s, reason)
        self.poll()  # a zero notice reclaims at once
        return reclaim_at

    def preempt_any(
        self, match: Match | Mapping[str, Any] | None = None, *, count: int = 1, notice_s: float | None = None
    ) -> list[str]:
        """Give notices to up to ``count`` running spot workers (matching ``match``) that have none yet, chosen
        by the seeded generator; their ids."""
        m = match if isinstance(match, Match) else Match.from_dict(match)
        now = self._clock()
        chosen: list[str] = []
        with self._lock:
            eligible = sorted(
                w.worker_id
                for w in self._workers.values()
                if w.state == "running"
                and w.market == "spot"
                and w.reclaim_at is None
                and m.matches(w.offer, "spot")
            )
            rng = self._rng("preempt-any")
            for worker_id in rng.sample(eligible, min(count, len(eligible))):
                self._give_notice(self._workers[worker_id], now, notice_s, "preempt_any() called")
                chosen.append(worker_id)
        self.poll()
        return chosen

    def terminate(self, handle: WorkerHandle, *, grace_s: float = 10.0) -> None:
        with self._lock:
            w = self._find(handle)
            if w is None or not w.alive:
                return
            if w.inner is None:  # still provisioning: nothing runs yet (a start in flight kills its process)
                w.state, w.detail = "exited", "terminated while provisioning"
                return
            w.terminating = True
            inner = w.inner
        try:
            self._local.terminate(inner, grace_s=grace_s)
        finally:
            with self._lock:
                st = self._local.describe(inner)
                w.terminating, w.reaped = False, True
                w.returncode = st.returncode
                if w.state == "running":
                    w.state, w.detail = "exited", f"terminated ({st.detail})" if st.detail else "terminated"

    def live_workers(
        self, *, market: str | None = None, match: Match | Mapping[str, Any] | None = None
    ) -> list[str]:
        """Ids of workers provisioning or running (optionally only one market's, or those matching)."""
        m = match if isinstance(match, Match) else Match.from_dict(match)
        self.poll()
        with self._lock:
            return sorted(
                w.worker_id
                for w in self._workers.values()
                if w.alive and (market is None or w.market == market) and m.matches(w.offer, w.market)
            )

    def close(self) -> None:
        """Stop every worker this provider started (SIGTERM, then SIGKILL) and its background thread."""
        with self._lock:
            self._closed = True
            self._events.clear()
            for w in self._workers.values():
                if w.state == "provisioning" and w.inner is None:
                    w.state, w.detail = "exited", "the sim provider was closed while it was provisioning"
            thread = self._thread
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._local.close()
        with self._lock:
            for w in self._workers.values():
                if w.inner is not None and not w.reaped:
                    st = self._local.describe(w.inner)
                    w.reaped, w.returncode = True, st.returncode
                    if w.state == "running":
                        w.state, w.detail = "exited", "the sim provider was closed"


__all__ = [
    "CapacityRule",
    "DelayRule",
    "Match",
    "PreemptionRule",
    "Provisioning",
    "QuotaRule",
    "SimProvider",
    "SimScenario",
]
