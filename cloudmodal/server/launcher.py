"""The reconciler's launches: where a worker may start, and the failover walk that starts it.

A launch runs in the background (on the reconciler's executor). It walks the candidates
(:func:`~cloudmodal.server.scaling_rules.launch_walk`): this machine when it has the GPU, then cloud offers in
placement's order; each failure blocks what it rules out (the offer, its quota scope, a class out of stock)
and the walk moves on, ranking again when a list runs out, so a tier out of stock gives way to the next. A
walk that starts nothing writes the worker off and backs the pool's launches off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudmodal.exception import Error, NoProviderError
from cloudmodal.gpu import GpuTier
from cloudmodal.ids import new_id
from cloudmodal.pricing.offers import ON_DEMAND
from cloudmodal.providers.gpu import summarize
from cloudmodal.server import models
from cloudmodal.server.reconciler_base import ReconcilerBase, describe_error
from cloudmodal.server.scaling_rules import (
    MAX_LAUNCH_TRIES,
    RANK_LIMIT,
    launch_backoff,
    launch_mode,
    launch_spacing,
    launch_walk,
    record_launch_failure,
    record_launch_success,
)
from cloudmodal.server.spot import PoolMarketState
from cloudmodal.spec import FunctionSpec

if TYPE_CHECKING:
    from cloudmodal.placement import DataLocality

log = logging.getLogger("cloudmodal.reconciler")

W = models.workers
SIGNAL_REFRESH_S = 60.0  # a launch fetches the clouds' live signals again when they are older than this
SIGNAL_MAX_AGE_S = 600.0  # ranking ignores a signal observed longer ago than this
CRASH_BACKOFF_S = 5.0  # a launch that crashed (a bug, not a provider's refusal) retries after this


@dataclass
class _Choice:
    """One way to start a worker: a provider, and for clouds the offer and market placement ranked."""

    provider: Any
    tier: GpuTier | None
    offer: Any = None
    market: str = ON_DEMAND
    price: float = 0.0
    key: Any = None
    tier_index: int = 0  # the tier's place in the function's gpu list
    egress: float | None = None  # USD of data transfer from the mounted volumes per start; None: no volumes
    per_hour: float = 0.0  # what placement compared: the price, plus egress spread over a worker's hours

    @property
    def cloud(self) -> str:
        return self.offer.cloud if self.offer is not None else self.provider.name

    def describe(self) -> str:
        if self.offer is None:
            return f"{self.provider.name}" + (f" {self.tier}" if self.tier else " (CPU)")
        o = self.offer
        egress = f" + ${self.egress:.2f} egress" if self.egress else ""
        return (
            f"{o.cloud} {o.zone or o.region} {o.instance_type} {self.tier} {self.market} ${self.price:.2f}/h"
            + egress
        )


class Launcher(ReconcilerBase):
    """Candidates and launches (a part of the reconciler)."""

    # the SHA-256 fingerprint of the certificate this control plane serves over TLS (set by ServerHandle):
    # handed to workers, which accept only that certificate (cloudmodal.tls)
    tls_fingerprint: str | None = None

    # -- resource checks at function registration ---------------------------------------------------------
    def check_resources(self, spec: FunctionSpec, *, allow_cpu_fallback: bool) -> None:
        if not spec.gpu or allow_cpu_fallback:
            return
        if self._local_tier(spec.gpu) is not None:
            return
        if self.cloud_choices(spec, "", self.clock(), ignore_blocks=True, limit=1):
            return
        raise NoProviderError(no_gpu_message(spec.gpu, self.local))

    def _runs_here(self, fn: Any, spec: FunctionSpec) -> bool:
        """Whether the pool's workers start on this machine (CPU work, a GPU this machine has, CPU fallback,
        no cloud enabled, a simulated cloud) rather than on cloud nodes: only those count against this
        machine's budget."""
        if not spec.gpu or self._local_tier(spec.gpu) is not None:
            return True
        if not self.clouds or any(getattr(p, "workers_on_this_machine", True) for p in self.clouds):
            return True
        return self.cp.secrets.open_env(fn.inline_env).get("CLOUDMODAL_CPU_FALLBACK") == "1"

    # -- candidates ------------------------------------------------------------------------------------------
    def _local_tier(self, tiers: tuple[GpuTier, ...]) -> GpuTier | None:
        can = getattr(self.local, "can_satisfy", None)
        if can is None:
            return None
        for t in tiers:
            if can((t,)):
                return t
        return None

    def _table(self, provider: Any) -> Any:
        table = self._tables.get(provider.name)
        if table is None:
            from cloudmodal.pricing.offers import OfferTable

            offers = provider.offers()
            table = offers if isinstance(offers, OfferTable) else OfferTable(offers)
            self._tables[provider.name] = table
        return table

    def _cloud_offers(self) -> list[Any]:
        """Every offer the enabled clouds sell (what a class block covers)."""
        return [o for prov in self.clouds for o in self._table(prov).offers]

    def cloud_choices(
        self,
        spec: FunctionSpec,
        fid: str,
        now: float,
        *,
        ignore_blocks: bool = False,
        force_on_demand: bool = False,
        spot_only: bool = False,
        limit: int = RANK_LIMIT,
        locality: DataLocality | None = None,
    ) -> list[_Choice]:
        """Cloud offers in placement's order; ``locality``: the data a worker reads (its egress is weighed)."""
        if not self.clouds or not spec.gpu:
            return []
        from cloudmodal.placement import PlacementPolicy, rank

        mode = launch_mode(
            spec.spot,
            self.market_policy,
            self._market(fid),
            now,
            on_demand=force_on_demand,
            spot_only=spot_only,
        )
        clouds = None if spec.cloud is None or spec.cloud in ("auto", "sim") else frozenset([spec.cloud])
        policy = PlacementPolicy(
            spot=mode,
            clouds=clouds,
            regions=frozenset(spec.region) or None,
            max_price_per_hour=spec.max_price_per_hour,
        )
        if ignore_blocks:
            blocked: frozenset[Any] = frozenset()
        else:
            with self._block_lock:
                blocked = self.blocks.active(now)
        out: list[_Choice] = []
        for prov in self.clouds:
            placement = rank(
                spec.gpu,
                self._table(prov),
                policy=policy,
                blocked=blocked,
                signals=() if ignore_blocks else self._fresh_signals(prov),
                limit=limit,
                locality=locality,
            )
            out += [
                _Choice(
                    prov,
                    c.tier,
                    c.offer,
                    c.market,
                    c.price,
                    c.key,
                    c.tier_index,
                    c.egress,
                    c.price if locality is None else locality.per_hour(c),
                )
                for c in placement.candidates
            ]
        if len(self.clouds) > 1:
            # one list as placement orders one cloud's: the user's tiers first, then price (with egress)
            out.sort(key=lambda c: (c.tier_index, c.per_hour))
        return out[:limit]

    def _choices(
        self,
        spec: FunctionSpec,
        fid: str,
        cpu_fallback: bool,
        now: float,
        force_on_demand: bool,
        spot_only: bool = False,
        locality: DataLocality | None = None,
    ) -> list[_Choice]:
        """Where to try to start the next worker, best first: this machine when it has the GPU (it costs
        nothing), then cloud offers in placement's order (tiers in the user's order, cheapest first, egress
        from ``locality`` counted). ``spot_only``: cloud spot offers only."""
        if spot_only:
            if not spec.gpu or cpu_fallback:
                return []
            return self.cloud_choices(spec, fid, now, spot_only=True, locality=locality)
        if not spec.gpu or cpu_fallback:
            return [_Choice(self.provider, None)]
        out: list[_Choice] = []
        tier = self._local_tier(spec.gpu)
        if tier is not None:
            out.append(_Choice(self.local, tier, tier_index=spec.gpu.index(tier)))
        return out + self.cloud_choices(spec, fid, now, force_on_demand=force_on_demand, locality=locality)

    def _data_locality(
        self, spec: FunctionSpec, app_id: str, fid: str, worker_id: str
    ) -> DataLocality | None:
        """Where the volumes a cloud worker of ``spec`` mounts are (None: none, or no cloud to weigh); a
        failure to tell is reported and ranks by price alone."""
        if not spec.volumes or not spec.gpu or not self.clouds:
            return None
        from cloudmodal.server.volume_locality import locality_for

        try:
            return locality_for(self.cp, spec)
        except Exception as e:
            why = describe_error(e)
            log.warning("data locality of function %s: %s", fid, why)
            self.cp.activity.event(
                "placement.locality_unknown",
                f"worker {worker_id}: where the mounted volumes are could not be read ({why}); "
                "ranking by price alone",
                app_id=app_id,
                function_id=fid,
                worker_id=worker_id,
            )
            return None

    # -- live signals ----------------------------------------------------------------------------------------
    def _fresh_signals(self, prov: Any) -> list[Any]:
        """``prov``'s live signals as last fetched, without those older than :data:`SIGNAL_MAX_AGE_S`: ranking
        reads them and never waits for a cloud (see :meth:`_refresh_signals`)."""
        fetched = self._signals.get(prov.name)
        if fetched is None:
            return []
        now = time.time()
        return [s for s in fetched[1] if now - (s.observed_at or fetched[0]) <= SIGNAL_MAX_AGE_S]

    def _refresh_signals(self) -> None:
        """Fetch the enabled clouds' signals (availability, spot prices, quota) when older than
        :data:`SIGNAL_REFRESH_S`. Runs on a launch's thread before it ranks; a cloud that fails keeps its
        last signals (they age out) and the failure is reported once."""
        from cloudmodal.providers.base import SupportsSignals

        for prov in self.clouds:
            if not isinstance(prov, SupportsSignals):
                continue
            with self._signals_lock:
                at = self._signals.get(prov.name, (0.0, []))[0]
                if time.time() - at < SIGNAL_REFRESH_S:
                    continue
                try:
                    got = list(prov.signals())
                except Exception as e:
                    self._signals[prov.name] = (time.time(), self._signals.get(prov.name, (0.0, []))[1])
                    self._failed(f"signals of {prov.name}", e)
                    continue
                self._succeeded(f"signals of {prov.name}")
                self._signals[prov.name] = (time.time(), got)

    # -- launching -------------------------------------------------------------------------------------------
    def _launch(
        self, fid: str, fn: Any, spec: FunctionSpec, *, force_on_demand: bool = False, spot_only: bool = False
    ) -> str:
        """Start one worker in the background (walking the candidates); returns its worker id.

        ``spot_only``: a worker wanted only if it runs on spot (a probe, a replacement of an on-demand
        worker); when no spot offer starts, the launch ends there, without backing off the pool's launches."""
        from cloudmodal.providers.base import LaunchRequest, NoCapacityError

        app_id = fn.app_id
        cpu_fallback = self.cp.secrets.open_env(fn.inline_env).get("CLOUDMODAL_CPU_FALLBACK") == "1"
        # The named secrets the function declares, read now (a rotated secret reaches new workers): into this
        # worker's environment only, under the control plane's own variables, which a secret cannot replace.
        # A missing one raises before a token is made or anything counted: the pool reports it and retries.
        from cloudmodal.server.svc_secrets import NamedSecrets, declared_named

        named = declared_named(spec.secrets)
        env = NamedSecrets(self.cp).resolve(named, f"Function {spec.name!r}: ") if named else {}
        worker_id = new_id("ta")
        token = self.cp.tokens.create(scope=f"worker:{worker_id}", name=worker_id)
        image = spec.image or {}
        env |= {
            "CLOUDMODAL_SERVER_URL": self.server_url,
            "CLOUDMODAL_TOKEN": token,
            "CLOUDMODAL_WORKER_ID": worker_id,
            "CLOUDMODAL_FUNCTION_ID": fid,
            "CLOUDMODAL_APP_ID": app_id,
            "CLOUDMODAL_WORKER_RECONNECT_S": f"{self.cp.settings.worker_reconnect_s:g}",
            "PYTHONUNBUFFERED": "1",
        }
        if self.tls_fingerprint:  # not a secret: what the worker checks the certificate against
            env["CLOUDMODAL_TLS_FINGERPRINT"] = self.tls_fingerprint
        self.cp.workers.add_worker(
            worker_id, app_id, fid, provider="-", market="", function_version=fn.version
        )
        # counted once the launch is certain to run (a failure above must not leave the pool counted busy)
        with self._lock:
            self._launching[fid] = self._launching.get(fid, 0) + 1
            if force_on_demand:
                self._od_launching[fid] = self._od_launching.get(fid, 0) + 1

        def go() -> None:
            tried: list[str] = []
            try:  # everything, so that a failure anywhere still settles the launch count and the worker row
                locality = None
                if spec.gpu and not cpu_fallback:
                    self._refresh_signals()
                    locality = self._data_locality(spec, app_id, fid, worker_id)
                state = self._market(fid)
                ranked_once = False

                def ranked() -> list[_Choice]:
                    # Ranked afresh whenever the walk runs out of candidates: blocks added meanwhile (by this
                    # walk or a concurrent one) take the offers and classes out of stock off the list.
                    nonlocal ranked_once
                    choices = self._choices(
                        spec, fid, cpu_fallback, self.clock(), force_on_demand, spot_only, locality
                    )
                    if not ranked_once and (len(choices) > 1 or (choices and choices[0].offer is not None)):
                        top = "; ".join(f"{i + 1}) {c.describe()}" for i, c in enumerate(choices[:3]))
                        near = (
                            {}
                            if locality is None
                            else {"data": locality.to_dict(), "notes": _locality_notes(locality, choices)}
                        )
                        self.cp.activity.event(
                            "placement.ranked",
                            f"worker {worker_id}: {len(choices)} candidates for gpu={','.join(str(t) for t in spec.gpu)}"
                            + (" (on-demand floor)" if force_on_demand else "")
                            + f": {top}"
                            + "".join(f"; {n}" for n in near.get("notes", ())),
                            app_id=app_id,
                            function_id=fid,
                            worker_id=worker_id,
                            **near,
                        )
                    ranked_once = True
                    return choices

                def blocked(c: _Choice) -> bool:
                    if c.key is None:
                        return False
                    with self._block_lock:
                        return c.key in self.blocks.active(self.clock())

                walk = iter(launch_walk(ranked, _choice_key, blocked, MAX_LAUNCH_TRIES))
                held: list[_Choice] = []  # a candidate pulled for a round it could not join
                rounds_failed: dict[str, int] = {}  # rounds of this walk that failed on each cloud
                hedge = 1  # candidates per round: more once the walk meets a capacity failure
                attempt = 0
                while True:
                    if self._stop.is_set():  # the control plane is stopping: start nothing more
                        tried.append("the control plane stopped")
                        break
                    batch = _next_round(walk, held, hedge, blocked)
                    if not batch:
                        break
                    gap = max(launch_spacing(rounds_failed.get(c.cloud, 0)) for c in batch)
                    if gap:  # no hot loops on one cloud (clouds rate-limit launches per account)
                        self.sleep(gap)
                    for c in batch:
                        self._note_tier(fid, app_id, spec, c, worker_id)
                    reqs = [
                        LaunchRequest(
                            worker_id=worker_id,
                            app_id=app_id,
                            function_id=fid,
                            gpu=c.tier,
                            offer=c.offer,
                            market=c.market,
                            cpu=spec.cpu,
                            memory_mb=spec.memory,
                            image_hash=spec.image_hash,
                            pip_packages=tuple(image.get("pip_packages") or ()),
                            env=env,
                            argv=("-m", "cloudmodal.worker"),
                            image=image,
                            attempt=attempt + i,
                        )
                        for i, c in enumerate(batch)
                    ]
                    attempt += len(batch)
                    if len(batch) > 1:
                        self.cp.activity.event(
                            "launch.hedged",
                            f"worker {worker_id}: trying {len(batch)} candidates at once after a capacity "
                            f"failure: {'; '.join(c.describe() for c in batch)}",
                            app_id=app_id,
                            function_id=fid,
                            worker_id=worker_id,
                        )
                    winner: tuple[_Choice, Any] | None = None
                    surplus: list[tuple[_Choice, Any]] = []
                    crash: BaseException | None = None
                    failed_on: set[str] = set()
                    for choice, handle, err in _try_round(batch, reqs):
                        if isinstance(err, Error):
                            failed_on.add(choice.cloud)
                            if isinstance(err, NoCapacityError) and choice.provider.hedged_tries:
                                hedge = max(1, self.settings.launch_hedge)
                            reason = getattr(err, "reason", None) or type(err).__name__
                            tried.append(f"{choice.describe()}: {reason}")
                            self._launch_failed(fid, app_id, state, choice, err, reason)
                            self.cp.activity.event(
                                "launch.failed",
                                f"{choice.describe()}: {type(err).__name__} ({reason}): {err}"
                                + ("; trying the next candidate" if len(tried) < MAX_LAUNCH_TRIES else ""),
                                app_id=app_id,
                                function_id=fid,
                                worker_id=worker_id,
                                offer=offer_dict(choice),
                                reason=reason,
                            )
                        elif err is not None:
                            crash = crash or err
                        elif winner is None:  # the round's best-ranked success is the worker's node
                            winner = (choice, handle)
                        else:
                            surplus.append((choice, handle))
                    for cloud in failed_on:
                        rounds_failed[cloud] = rounds_failed.get(cloud, 0) + 1
                    if winner is not None:
                        self._launched(
                            fid,
                            app_id,
                            worker_id,
                            winner[0],
                            winner[1],
                            state,
                            cpu_fallback and bool(spec.gpu),
                        )
                        for choice, handle in surplus:
                            self._discard_surplus(app_id, fid, worker_id, choice, handle, winner[0])
                        if crash is not None:
                            log.error(
                                "a hedged launch try crashed: %s", describe_error(crash), exc_info=crash
                            )
                        return
                    if crash is not None:
                        raise crash
                if spot_only:
                    why = "; ".join(tried[-5:]) or "no spot offer to try"
                    self.cp.workers.worker_stopped(worker_id, f"no spot worker started: {why}", crashed=False)
                    self.cp.activity.event(
                        "launch.spot_unavailable",
                        f"worker {worker_id} was wanted on spot only and no spot offer started "
                        f"({len(tried)} tried); the pool stays as it is. {why}",
                        app_id=app_id,
                        function_id=fid,
                    )
                    return
                n = self._launch_failures.get(fid, 0) + 1
                self._launch_failures[fid] = n
                delay = launch_backoff(n)
                self._next_launch_at[fid] = self.clock() + delay
                why = "; ".join(tried[-5:]) or "no candidate offers (all blocked or none match)"
                self.cp.workers.worker_stopped(worker_id, f"launch failed: {why}", crashed=False)
                self.cp.activity.event(
                    "launch.exhausted",
                    f"no candidate could start a worker ({len(tried)} tried); retrying in {delay:g} s. {why}",
                    app_id=app_id,
                    function_id=fid,
                )
            except Exception as e:  # a provider bug must not kill the loop
                self._next_launch_at[fid] = self.clock() + CRASH_BACKOFF_S
                why = describe_error(e)
                if self._launch_errors.get(fid) != why:  # once per distinct error, not every retry
                    self._launch_errors[fid] = why
                    log.error("launch for function %s crashed: %s", fid, why, exc_info=e)
                    self._report("launch.crashed", f"starting a worker crashed: {why}", app_id, fid)
                try:
                    self.cp.workers.worker_stopped(worker_id, f"launch crashed: {why}", crashed=False)
                except Exception as e2:
                    log.warning("could not write off worker %s: %s", worker_id, describe_error(e2))
            finally:
                with self._lock:
                    self._launching[fid] = max(0, self._launching.get(fid, 1) - 1)
                    if force_on_demand:
                        self._od_launching[fid] = max(0, self._od_launching.get(fid, 1) - 1)

        self._pool.submit(go)
        return worker_id

    def _launch_failed(
        self, fid: str, app_id: str, state: PoolMarketState, choice: _Choice, e: Error, reason: str
    ) -> None:
        """Record what a failed launch rules out (:func:`~cloudmodal.server.scaling_rules.record_launch_failure`):
        the offer, its quota scope, the class of offers a run of capacity failures shows out of stock, and a
        spot failure against the pool's market; and say so in events."""
        from cloudmodal.providers.base import NoCapacityError, QuotaExceededError

        now = self.clock()
        quota = isinstance(e, QuotaExceededError)
        capacity = isinstance(e, NoCapacityError)
        with self._block_lock:
            got = record_launch_failure(
                self.market_policy,
                self.blocks,
                state,
                choice.key,
                choice.market,
                now,
                f"{type(e).__name__}: {reason}",
                quota=quota,
                capacity=capacity,
                quota_offers=self._table(choice.provider) if quota and choice.key is not None else (),
                stockouts=self.stockouts,
                class_offers=self._cloud_offers() if capacity and choice.key is not None else (),
            )
        for c, until, why in got.classes:
            self.cp.activity.event(
                "placement.class_blocked",
                f"{c.describe()} blocked for {until - now:.0f} s: {why}; launches skip its offers until then",
                app_id=app_id,
                function_id=fid,
                gpu=c.gpu,
                market=c.market,
                cloud=c.cloud,
                until=until,
            )
        if got.spot_fallback:
            self.cp.activity.event("pool.spot_fallback", got.spot_fallback, app_id=app_id, function_id=fid)

    def _discard_surplus(
        self, app_id: str, fid: str, worker_id: str, choice: _Choice, handle: Any, kept: _Choice
    ) -> None:
        """Terminate a node that started in the same hedged round as the worker's own (see
        ``ReconcilerSettings.launch_hedge``). Should the call fail, the node is still tagged with the worker and
        is not the node its row names, so the next inventory terminates it."""
        prov = choice.provider
        try:
            if hasattr(prov, "discard"):
                prov.discard(handle)
            else:
                prov.terminate(handle, grace_s=0.0)
            outcome = "terminated at once"
        except Exception as e:
            outcome = f"not terminated yet ({describe_error(e)}); the next inventory terminates it"
        self.cp.activity.event(
            "launch.hedge_surplus",
            f"worker {worker_id}: {choice.describe()} also started in the hedged round that gave "
            f"{kept.describe()} (kept: ranked first); node {handle.instance_id} {outcome}, billed the "
            f"cloud's minimum (about a minute at ${handle.price_per_hour:.2f}/h)",
            app_id=app_id,
            function_id=fid,
            worker_id=worker_id,
            instance_id=handle.instance_id,
            offer=offer_dict(choice),
            price_per_hour=handle.price_per_hour,
        )

    def _note_tier(self, fid: str, app_id: str, spec: FunctionSpec, choice: _Choice, worker_id: str) -> None:
        """Say (once per move) when a pool's launches move on to a later tier, and why: the classes of the
        earlier tiers that are blocked."""
        ti = choice.tier_index
        with self._lock:
            prev = self._tiers.get(fid, 0)
            if ti == prev:
                return
            self._tiers[fid] = ti
        if ti < prev or not spec.gpu:  # back to an earlier tier: worker.launched says where
            return
        skipped = spec.gpu[:ti]
        types = {t.type for t in skipped}
        with self._block_lock:
            classes = [(c, why) for c, _until, why in self.stockouts.active(self.clock()) if c.gpu in types]
        because = (
            "; ".join(f"{c.describe()} blocked ({why})" for c, why in classes)
            or "every candidate of it is blocked or was tried"
        )
        self.cp.activity.event(
            "placement.next_tier",
            f"worker {worker_id}: gpu {', '.join(str(t) for t in skipped)} is out of stock ({because}); "
            f"moving on to tier {ti + 1}, {choice.tier}: {choice.describe()}",
            app_id=app_id,
            function_id=fid,
            worker_id=worker_id,
            tier=str(choice.tier),
            tier_index=ti,
            blocked=[c.describe() for c, _ in classes],
        )

    def _launched(
        self,
        fid: str,
        app_id: str,
        worker_id: str,
        choice: _Choice,
        handle: Any,
        state: PoolMarketState,
        cpu_fallback: bool,
    ) -> None:
        with self._block_lock:
            restored = record_launch_success(
                self.market_policy,
                state,
                choice.key,
                choice.market,
                self.clock(),
                stockouts=self.stockouts,
            )
        self._launch_failures.pop(fid, None)
        self._launch_errors.pop(fid, None)
        with self._lock:
            self.handles[worker_id] = (choice.provider, handle)
        launched_at = time.time()  # the cost ledger bills the worker from here (cloudmodal.server.ledger)
        if restored:
            self.cp.activity.event("pool.spot_restored", restored, app_id=app_id, function_id=fid)
        with self.cp.db.write() as conn:
            conn.execute(
                W.update()
                .where(W.c.id == worker_id)
                .values(
                    provider=choice.provider.name,
                    instance_id=handle.instance_id,
                    price_per_hour=handle.price_per_hour,
                    market=handle.market,
                    gpu=str(choice.tier) if choice.tier else None,
                    offer=offer_dict(choice),
                    handle=handle.to_wire(),
                    launched_at=launched_at,
                )
            )
        self.cp.activity.event(
            "worker.launched",
            f"worker {worker_id} launched: {choice.describe()}" + (" (CPU fallback)" if cpu_fallback else ""),
            app_id=app_id,
            function_id=fid,
            worker_id=worker_id,
            offer=offer_dict(choice),
            market=handle.market,
            price_per_hour=handle.price_per_hour,
            launched_at=launched_at,
            **({} if choice.egress is None else {"egress_usd": round(choice.egress, 6)}),
        )


def _next_round(walk: Iterator[_Choice], held: list[_Choice], width: int, blocked: Any) -> list[_Choice]:
    """The next candidates to try at once: up to ``width``, all on providers that allow hedged tries (a
    candidate that cannot join waits in ``held`` for the next round); one when the first cannot hedge."""
    batch: list[_Choice] = []
    while len(batch) < width:
        if held:
            c = held.pop()
            if blocked(c):  # blocked by the round that held it back
                continue
        else:
            nxt = next(walk, None)
            if nxt is None:
                break
            c = nxt
        hedges = bool(getattr(c.provider, "hedged_tries", False))
        if batch and not hedges:
            held.append(c)
            break
        batch.append(c)
        if not hedges:
            break
    return batch


def _try_round(batch: list[_Choice], reqs: list[Any]) -> list[tuple[_Choice, Any, BaseException | None]]:
    """Launch each of ``batch`` (with its request), all at once; ``(choice, handle, error)`` in ``batch``'s
    order. The first runs on this thread, the others on threads of their own (the launch executor's threads
    are the walks'; a round must not wait for one of them)."""
    out: list[tuple[_Choice, Any, BaseException | None]] = [(c, None, None) for c in batch]

    def one(i: int) -> None:
        try:
            out[i] = (batch[i], batch[i].provider.launch(reqs[i]), None)
        except Exception as e:
            out[i] = (batch[i], None, e)

    threads = [
        threading.Thread(target=one, args=(i,), name=f"launch-try-{i}", daemon=True)
        for i in range(1, len(batch))
    ]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    return out


def _choice_key(c: _Choice) -> Any:
    """What a walk tries at most once: the offer in its market, or the provider and tier without an offer."""
    return c.key if c.key is not None else (c.provider.name, str(c.tier))


def offer_dict(choice: _Choice) -> dict[str, Any] | None:
    o = choice.offer
    if o is None:
        return {"cloud": choice.provider.name, "gpu": str(choice.tier) if choice.tier else None}
    return {
        "cloud": o.cloud,
        "region": o.region,
        "zone": o.zone,
        "instance_type": o.instance_type,
        "gpu": str(choice.tier),
        "market": choice.market,
        "price_per_hour": choice.price,
        "on_demand_per_hour": o.price_ondemand,  # what the same hours cost on demand, at launch (spot savings)
        **({} if choice.egress is None else {"egress_usd": round(choice.egress, 6)}),
    }


def _locality_notes(locality: DataLocality, choices: list[_Choice]) -> list[str]:
    """What placement could not count, and why the first offer won over a cheaper far one (across clouds)."""
    notes = locality.notes()
    cloud = [c for c in choices if c.offer is not None]
    if not cloud:
        return notes
    best = cloud[0]
    cheap = min((c for c in cloud if c.tier_index == best.tier_index), key=lambda c: c.price)
    if cheap.price < best.price and (cheap.egress or 0.0) > (best.egress or 0.0):
        data = ", ".join(str(r) for r in locality.reads if r.gb)
        notes.append(
            f"near the data: {best.describe()} ranks above the cheaper {cheap.describe()}, which would read "
            f"{data} from afar (${cheap.per_hour:.2f}/h against ${best.per_hour:.2f}/h over a "
            f"{locality.worker_hours:g} h worker)"
        )
    return notes


def no_gpu_message(tiers: tuple[GpuTier, ...], provider: Any) -> str:
    want = ", ".join(str(t) for t in tiers)
    have = ""
    inv = getattr(provider, "gpu_inventory", None)
    if inv is not None:
        try:
            have = summarize(inv())
        except Exception:
            have = "unknown"
    lines = [
        f"No enabled provider can run gpu={want!r}: this machine has {have or 'no GPUs'} and no cloud is enabled."
    ]
    offers = _cheapest_offers(tiers)
    if offers:
        lines.append("Cheapest cloud offers for it:")
        lines.extend(f"  {o}" for o in offers)
    lines.append(
        "To run it: enable a cloud (`pip install 'cloudmodal[aws]'` and configure credentials), "
        "or pass `--gpu-fallback cpu` to `cloudmodal run` (or set CLOUDMODAL_GPU_FALLBACK=cpu) to run it on CPU "
        "for development."
    )
    return "\n".join(lines)


def _cheapest_offers(tiers: tuple[GpuTier, ...], n: int = 3) -> list[str]:
    try:
        from cloudmodal.placement import PlacementPolicy, rank
        from cloudmodal.pricing.catalog import load_offer_table
    except ImportError:
        return []
    try:
        table = load_offer_table()
        placement = rank(tiers, table, policy=PlacementPolicy())
    except Error:
        return ["(no price catalog here: run `cloudmodal pricing refresh` to see cloud offers)"]
    except Exception:
        return []
    out = []
    for c in placement.candidates[:n]:
        o = c.offer
        out.append(f"{c.tier} on {o.cloud} {o.region} {o.instance_type}: ${c.price:.2f}/h ({c.market})")
    return out
