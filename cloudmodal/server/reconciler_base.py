"""What the reconciler's parts share: its settings, its state, and the isolation of failures.

:class:`ReconcilerBase` holds the state of one control plane's reconciler (launches in flight, handles, the
spot policy's blocks and market history) and the helpers every part uses to run one step, or one pool's
work, without letting a failure stop the others. The parts are mixins over it: launching
(:mod:`cloudmodal.server.launcher`), health (:mod:`cloudmodal.server.health`), estimates
(:mod:`cloudmodal.server.estimates`); :class:`~cloudmodal.server.reconciler.Reconciler` is the loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from cloudmodal.exception import InvalidError
from cloudmodal.server import models
from cloudmodal.server.autoscaler import Autoscaler
from cloudmodal.server.db import Leadership
from cloudmodal.server.estimates import StartupTimes
from cloudmodal.server.retention import Pruner
from cloudmodal.server.scheduler import Scheduler
from cloudmodal.server.service import ControlPlane
from cloudmodal.server.spot import BlockList, MarketPolicy, MarketSettings, PoolMarketState, StockoutLog

log = logging.getLogger("cloudmodal.reconciler")

P = models.pools
MAX_ERROR_CHARS = 400  # of an exception's text in a pool.error event or a log line


LAUNCH_THREADS = 64  # launches in flight at once, all pools together (each walk blocks one while it tries)
LAUNCH_HEDGE = 4  # see ReconcilerSettings.launch_hedge


def _default_max_workers() -> int:
    return max(4, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class ReconcilerSettings:
    """The reconciler's knobs. Construct it directly (tests), or with :meth:`from_env` (the default)."""

    market: MarketSettings = field(default_factory=MarketSettings)  # the spot policy's thresholds
    # This machine's worker budget: workers beyond the cores only add start-up cost and contention.
    max_workers: int = field(default_factory=_default_max_workers)
    launch_threads: int = LAUNCH_THREADS  # launches in flight at once (cloud launches wait on APIs, not CPU)
    launch_hedge: int = LAUNCH_HEDGE  # cloud candidates tried at once once a walk has met a capacity failure

    @classmethod
    def from_env(cls, environ: Any = None) -> ReconcilerSettings:
        """From the environment (``environ``, default ``os.environ``): ``CLOUDMODAL_SPOT_SETTINGS`` (JSON,
        e.g. ``{"probe_interval_s": 30}``) overrides the spot policy's thresholds and
        ``CLOUDMODAL_LOCAL_MAX_WORKERS`` the local worker budget, ``CLOUDMODAL_LAUNCH_THREADS`` and
        ``CLOUDMODAL_LAUNCH_HEDGE`` the launches. The only place the reconciler reads it."""
        from cloudmodal.settings import settings

        s = settings(environ)
        market = MarketSettings()
        if s.spot_settings is not None:
            try:
                market = MarketSettings(**s.spot_settings)
            except (ValueError, TypeError) as e:
                raise InvalidError(
                    f"CLOUDMODAL_SPOT_SETTINGS is not valid: {e}. Example: '{{\"probe_interval_s\": 30}}'."
                ) from None
        return cls(
            market=market,
            max_workers=s.local_max_workers or _default_max_workers(),
            launch_threads=s.launch_threads,
            launch_hedge=s.launch_hedge,
        )


def describe_error(e: BaseException) -> str:
    """An exception as one bounded line (type and message): what events and logs say about a failure."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class ReconcilerBase:
    """The reconciler's state, and running steps in isolation (see the module's docstring)."""

    def __init__(
        self,
        cp: ControlPlane,
        providers: Any,
        server_url: str,
        *,
        clock: Callable[[], float] = time.time,
        settings: ReconcilerSettings | None = None,
        executor: Executor | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cp = cp
        if not isinstance(providers, dict):
            providers = {providers.name: providers}
        self.providers: dict[str, Any] = providers
        self.local = providers.get("local")
        self.clouds = [p for name, p in providers.items() if name != "local"]
        self.provider = self.local or next(iter(providers.values()))  # CPU-only work runs here
        self.server_url = server_url
        self.clock = clock  # every decision's "now"; real waits (sleep, shutdown) use real time
        self.sleep = sleep
        self.settings = settings if settings is not None else ReconcilerSettings.from_env()
        self._tables: dict[str, Any] = {}
        self.autoscaler = Autoscaler()
        self.startup_times = StartupTimes()
        self.market_policy = MarketPolicy(self.settings.market)
        self.market_state: dict[str, PoolMarketState] = {}
        self.blocks = BlockList()
        self.stockouts = StockoutLog()  # capacity failures by class (GPU type, market, cloud), every pool's
        # Launch threads of every pool add blocks while others rank: the block list and stockouts are shared.
        self._block_lock = threading.Lock()
        # function id -> {spot replacement's worker id: the on-demand worker it replaces, drained once it is ready}
        self._replacing: dict[str, dict[str, str]] = {}
        # function id -> the tier its launches last tried (to say when they move on)
        self._tiers: dict[str, int] = {}
        self.handles: dict[str, tuple[Any, Any]] = {}  # worker id -> (provider, handle)
        self._noticed: set[str] = set()
        self._launching: dict[str, int] = {}
        self._od_launching: dict[
            str, int
        ] = {}  # launches forced on-demand (the min_on_demand floor) in flight
        self._launch_failures: dict[str, int] = {}
        self._next_launch_at: dict[str, float] = {}
        self._pool: Executor = executor or ThreadPoolExecutor(
            self.settings.launch_threads, thread_name_prefix="launch"
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self._last_inventory = 0.0  # when the providers' machines were last listed (Health._settle_inventory)
        self.pruner = Pruner(cp)  # retention: old calls, logs and blobs
        self.scheduler = Scheduler(cp)  # deployed functions' schedules
        from cloudmodal.server.budgets import Budgets

        self.budgets = Budgets(cp, clock)  # apps' budgets cap their launches (periods on this clock)
        self._lock = threading.Lock()
        self.leadership = Leadership(cp.db)
        self._pool_rows: dict[str, tuple[Any, ...]] = {}  # function id -> what its pool row says now
        self._market_lock = threading.Lock()
        self._floors: dict[str, frozenset[str]] = {}  # function id -> the on-demand floor last set
        self.max_workers = self.settings.max_workers
        self._live_total = 0  # workers on this machine, and launches in flight for it (its budget)
        self._cloud_pools: set[str] = set()  # function ids whose workers run on cloud nodes
        self._served: set[str] = set()  # functions with live workers at the last tick
        self._web_last: dict[str, float] = {}  # function id -> its last web request (this control plane's)
        self._idle_elsewhere: list[tuple[float, str, str]] = []  # (idle since, worker id, function id)
        # Failures are isolated per pool (and per global step, per worker) and reported once per distinct
        # error, not on every tick: function id -> the error its pool last failed with.
        self._pool_errors: dict[str, str] = {}
        self._step_errors: dict[str, str] = {}  # global step or worker -> the error it last failed with
        self._launch_errors: dict[str, str] = {}  # function id -> the error its last launch crashed with
        # provider name -> (when fetched, its live signals): read by ranking, refreshed by launches
        self._signals: dict[str, tuple[float, list[Any]]] = {}
        self._signals_lock = threading.Lock()
        self._spec_checks: dict[str, tuple[int, str | None]] = {}  # function id -> (version, why invalid)

    def wake(self) -> None:
        self._wake.set()

    # -- isolation: one failing pool, step or worker never stops the others -----------------------------------
    def _step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run one global step (or one worker's part of it); a failure is logged once per distinct error."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._failed(name, e)
        else:
            self._succeeded(name)

    def _failed(self, name: str, e: BaseException) -> None:
        why = describe_error(e)
        if self._step_errors.get(name) != why:
            self._step_errors[name] = why
            log.error(
                "reconciler: %s failed (logged again only if the error changes): %s", name, why, exc_info=e
            )

    def _succeeded(self, name: str) -> None:
        if self._step_errors and self._step_errors.pop(name, None) is not None:
            log.info("reconciler: %s works again", name)

    def _report(self, kind: str, message: str, app_id: str | None, fid: str) -> None:
        try:
            self.cp.activity.event(kind, message, app_id=app_id, function_id=fid)
        except Exception as e:  # the database may be what failed; the log line above still says it
            log.warning("reconciler: could not record %s for %s: %s", kind, fid, describe_error(e))

    # -- a pool's market history ---------------------------------------------------------------------------
    def _market(self, fid: str) -> PoolMarketState:
        """The pool's market history: in memory, or (first use after a start or a take-over) its row's."""
        state = self.market_state.get(fid)
        if state is None:
            with self._market_lock:  # launch threads ask too: load once, share one state
                state = self.market_state.get(fid)
                if state is None:
                    with self.cp.db.read() as conn:
                        wire = conn.execute(select(P.c.market_state).where(P.c.function_id == fid)).scalar()
                    state = PoolMarketState.from_wire(wire) if wire else PoolMarketState()
                    self.market_state[fid] = state
        return state
