"""How many workers a pool should have: a pure decision, table-tested.

:meth:`Autoscaler.decide` reads a :class:`PoolSnapshot` and the time ``now`` (passed in; this module never
reads the clock) and returns a :class:`ScaleDecision`. The reconciler applies it through a provider.

Rules, in order:

1. ``needed``: the workers the load asks for. In-flight inputs on draining workers count (their replacement
   starts before they are gone), but draining workers do not count as capacity.

   - Without estimates (``service_time_s`` None): ``needed = ceil((backlog + in_flight) / per_worker_target)``,
     a slot for every input, queued or running.
   - With a service-time estimate (mean seconds per input on one slot): the in-flight inputs keep
     ``in_flight / target`` workers; the backlog asks only for the workers that clear it within a horizon
     ``H``: the pool's start-up ``startup_s`` (launch → ready) when it is known, at least
     ``min_drain_horizon_s`` (1 s by default, a sanity floor), and ``default_drain_horizon_s`` (30 s by
     default) while it is unknown::

         needed = ceil(in_flight / target + backlog × service_time_s / (target × H))

     A worker launched now only helps after ``startup_s``; asking for more than that pays boots for work the
     running workers (and the ones already starting) would finish first. The rule converges on the arrival
     rate: while a pool is short of ``d`` workers its backlog grows by ``d × target / service`` inputs a
     second, so after one start-up the backlog term asks for about ``d`` more. The backlog then drains within
     about ``startup_s + H`` of a spike, where the estimate-free rule would drain it within one start-up, so
     waits during a spike are longer and boots far fewer. ``needed`` is never more than the estimate-free rule
     (a queued input needs at most one slot), never less than ``ceil(in_flight / target)``, and at least 1
     while there is a backlog (a pool without workers always gets one). A pool that boots fast fans out: on
     the local provider (start-up ~0.2 s, so H = 1 s) a ``.map()`` of 100 inputs of 2 s asks for 100 workers,
     one per input, as it would without estimates; one that boots in 10 s asks for 20.
2. The pool is *active* while there is work, and for ``scaledown_window`` seconds after the last work
   (``last_active_at``). While active, ``desired = needed + buffer_containers``; otherwise 0.
3. ``desired`` is clamped to ``[min_containers, max_containers]``; when ``min > max``, ``max`` wins (it is
   the spending cap).
4. Capacity = starting + ready workers. Starting workers count, so nothing is launched twice while workers
   boot. ``launch = desired - capacity`` (at most ``max_launch_per_step``, when set).
5. Scale-down: when capacity exceeds ``desired``, stop only *ready* workers that are idle (no in-flight
   inputs) and have been idle for at least ``scaledown_window`` seconds — never below ``desired``, so never
   below ``min_containers``, nor below ``needed + buffer`` while active. Starting workers are never stopped
   by this rule (they become idle workers, and the window applies to them then).
   Above ``max_containers`` (settings lowered under a running pool) idle and starting workers are stopped at
   once, without waiting for the window; busy ones are left to finish.
6. Which idle workers go first: the most expensive (``price_per_hour``; on-demand before spot when a pool
   mixes them), then the **most recently started**. Kubernetes' ReplicaSet makes the same choice: long-lived
   workers have paid their cold start (``@enter`` hooks, model weights, compiled kernels, page cache) and have
   proven healthy, so the pool's stable core stays warm while the newest, least-invested workers absorb the
   churn of a bursty load. Ties break on ``worker_id`` so decisions are deterministic. Workers of the pool's
   on-demand floor (``WorkerView.floor``: the ``min_on_demand`` the user asked to keep beside spot) go last
   of all, so a shrinking pool keeps them while it keeps anything.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cloudmodal.server.states import WorkerState
from cloudmodal.spec import AutoscalerSettings, BatchConfig, ConcurrencyConfig

# A live worker's state: a WorkerState member, or its value as a row reads back.
WorkerPoolState = (
    Literal[WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING]
    | Literal["starting", "ready", "draining"]
)

MIN_DRAIN_HORIZON_S = 1.0  # the shortest horizon rule 1 drains a backlog over (a sanity floor on start-up)
DEFAULT_DRAIN_HORIZON_S = 30.0  # rule 1's horizon while the pool's start-up is unknown


def per_worker_target(concurrency: ConcurrencyConfig | None, batching: BatchConfig | None) -> int:
    """Inputs one worker should hold at once, which the autoscaler divides the load by.

    ``@concurrent``: ``target_inputs`` when given (the worker may burst to ``max_inputs``, but scaling aims at
    the target, as Modal does), else ``max_inputs``. ``@batched``: ``max_batch_size``, because a batched
    worker takes that many inputs per call (one call at a time, whatever ``@concurrent`` says: the worker runs
    its batches in turn); scaling on single inputs would start one worker per input and each would run batches
    of one, defeating the batching.
    """
    if batching is not None:
        return max(int(batching.max_batch_size), 1)
    target = 1
    if concurrency is not None:
        target = concurrency.target_inputs or concurrency.max_inputs or 1
    return max(int(target), 1)


@dataclass(frozen=True)
class WorkerView:
    """What the autoscaler sees of one worker. ``idle_since`` is None while the worker has inputs."""

    worker_id: str
    state: WorkerPoolState
    started_at: float
    idle_since: float | None = None
    in_flight: int = 0
    price_per_hour: float = 0.0
    floor: bool = False  # one of the pool's min_on_demand on-demand workers: stopped after every other


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool's load and workers at a moment.

    ``backlog``: inputs waiting for a worker. ``in_flight``: inputs being run (all workers, draining ones
    included). ``last_active_at``: the last time there was backlog or in-flight work (None: never).

    Estimates, None while unknown (rule 1 then asks for a slot per input, as without them):
    ``service_time_s``: mean seconds one input takes on one slot, from the results the workers reported.
    ``startup_s``: seconds from launch to ready of the pool's recent workers.
    """

    backlog: int
    in_flight: int
    workers: Sequence[WorkerView]
    settings: AutoscalerSettings
    last_active_at: float | None = None
    per_worker_target: int = 1
    max_launch_per_step: int | None = None
    service_time_s: float | None = None
    startup_s: float | None = None


@dataclass(frozen=True)
class ScaleDecision:
    """``desired``: the worker count to converge on. ``launch``: how many to start now. ``terminate``: ids of
    workers to stop now. ``reason``: one line for the event log, written when first read (most decisions
    change nothing and nobody reads theirs; formatting it every time was a third of a decision's cost)."""

    desired: int
    launch: int
    terminate: tuple[str, ...]
    explain: Callable[[], str] = field(repr=False, compare=False)

    @functools.cached_property
    def reason(self) -> str:
        return self.explain()

    @property
    def is_noop(self) -> bool:
        return self.launch == 0 and not self.terminate


def _stop_order(w: WorkerView) -> tuple[bool, float, float, str]:
    return (w.floor, -w.price_per_hour, -w.started_at, w.worker_id)


class Autoscaler:
    """The pure scaling decision for one pool (stateless; one instance can serve every pool).

    Rule 1's horizon, when the service time is known: the pool's start-up, at least ``min_drain_horizon_s``
    (a sanity floor: a start-up measured at ~0 s must not ask for a worker per input of every backlog), and
    ``default_drain_horizon_s`` while the start-up is unknown (also at least ``min_drain_horizon_s``).
    """

    def __init__(
        self,
        min_drain_horizon_s: float = MIN_DRAIN_HORIZON_S,
        default_drain_horizon_s: float = DEFAULT_DRAIN_HORIZON_S,
    ) -> None:
        self.min_drain_horizon_s = max(float(min_drain_horizon_s), 1e-3)
        self.default_drain_horizon_s = max(float(default_drain_horizon_s), self.min_drain_horizon_s)

    def drain_horizon(self, startup_s: float | None) -> float:
        """Rule 1's horizon H for a pool whose start-up estimate is ``startup_s`` (None: unknown)."""
        if startup_s is None or not math.isfinite(startup_s):
            return self.default_drain_horizon_s
        return max(float(startup_s), self.min_drain_horizon_s)

    def needed(self, snapshot: PoolSnapshot) -> tuple[int, Callable[[], str]]:
        """Rule 1: the workers the load asks for, and how the reason line explains it (formatted on demand)."""
        target = max(int(snapshot.per_worker_target), 1)
        backlog, in_flight = max(snapshot.backlog, 0), max(snapshot.in_flight, 0)
        load = backlog + in_flight
        per_input = math.ceil(load / target)  # a slot for every input, queued or running

        def head() -> str:
            return f"load {load} (backlog {backlog}, in flight {in_flight}) / {target} per worker"

        service = snapshot.service_time_s
        if service is None or not math.isfinite(service):
            return per_input, lambda: f"{head()} = {per_input} needed"
        service = max(service, 0.0)
        horizon = self.drain_horizon(snapshot.startup_s)
        for_in_flight = in_flight / target
        for_backlog = backlog * service / (target * horizon)
        # ceil with a little slack, so float noise (0.1 + 0.2) does not add a worker.
        needed = math.ceil(for_in_flight + for_backlog - 1e-9)
        needed = max(needed, math.ceil(in_flight / target), 1 if backlog else 0)
        capped = needed > per_input
        needed = min(needed, per_input)

        def why() -> str:
            return (
                f"{head()}: in flight {for_in_flight:.2f} + backlog {backlog} × {service:.3g} s ÷ "
                f"{round(horizon, 1):g} s horizon {for_backlog:.2f} = {needed} needed"
                + (" (one slot per input)" if capped else "")
            )

        return needed, why

    def decide(self, snapshot: PoolSnapshot, now: float) -> ScaleDecision:
        s = snapshot.settings
        load = max(snapshot.backlog, 0) + max(snapshot.in_flight, 0)
        needed, why = self.needed(snapshot)
        window = max(float(s.scaledown_window), 0.0)

        active = load > 0 or (snapshot.last_active_at is not None and now - snapshot.last_active_at < window)
        want = needed + max(s.buffer_containers, 0) if active else 0
        lo = max(s.min_containers, 0)
        hi = s.max_containers if s.max_containers is not None else math.inf
        desired = int(min(max(want, lo), hi))

        starting = [w for w in snapshot.workers if w.state == WorkerState.STARTING]
        ready = [w for w in snapshot.workers if w.state == WorkerState.READY]
        capacity = len(starting) + len(ready)

        launch = max(desired - capacity, 0)
        if snapshot.max_launch_per_step is not None:
            launch = min(launch, max(snapshot.max_launch_per_step, 0))

        terminate: list[str] = []
        if capacity > hi or capacity > desired:
            idle = [w for w in ready if w.idle_since is not None and w.in_flight == 0]
        if capacity > hi:
            # Over the cap: stop idle and starting workers now, busy ones are left to finish.
            spare = sorted(idle, key=_stop_order) + sorted(starting, key=_stop_order)
            terminate = [w.worker_id for w in spare[: capacity - int(hi)]]
        elif capacity > desired:
            expired = [w for w in idle if now - w.idle_since >= window]  # type: ignore[operator]
            terminate = [w.worker_id for w in sorted(expired, key=_stop_order)[: capacity - desired]]

        n_starting, n_ready, n_all = len(starting), len(ready), len(snapshot.workers)

        def explain() -> str:
            draining = n_all - capacity
            parts = [why()]
            if active and s.buffer_containers:
                parts.append(f"+{s.buffer_containers} buffer")
            if not active:
                parts.append(f"idle for ≥{window:g}s")
            bounds = f"[{lo}, {'∞' if hi == math.inf else int(hi)}]"
            parts.append(f"desired {desired} in {bounds}")
            parts.append(
                f"capacity {capacity} ({n_starting} starting, {n_ready} ready"
                + (f", {draining} draining" if draining else "")
                + ")"
            )
            if launch:
                capped = desired - capacity > launch
                parts.append(f"launch {launch}" + (" (capped per step)" if capped else ""))
            if terminate:
                cause = "over max_containers" if capacity > hi else "idle for the scaledown window"
                parts.append(f"stop {len(terminate)} ({cause})")
            elif capacity > desired:
                parts.append("surplus kept until idle for the scaledown window")
            return "; ".join(parts)

        return ScaleDecision(desired, launch, tuple(terminate), explain)
