"""The estimates the reconciler passes the autoscaler: a function's start-up time and its service time.

:class:`StartupTimes` is pure (it holds the samples it is given); :class:`Estimates` is the reconciler's part
that feeds it from the database and the live workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select

from cloudmodal.server import models

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

W = models.workers
STARTUP_SAMPLES = 16  # the start-up estimate is the median launch → ready of this many recent workers


class StartupTimes:
    """Launch → ready (``ready_at - started_at``) of each function's most recent workers; the autoscaler's
    start-up estimate is their median (robust to one slow image pull or one instant local start)."""

    def __init__(self, keep: int = STARTUP_SAMPLES) -> None:
        self.keep = max(int(keep), 1)
        self._boots: dict[str, dict[str, float]] = {}  # function id -> worker id -> seconds, oldest first
        self._median: dict[str, float | None] = {}
        # function id -> the latest ready_at taken (older ones are skipped)
        self._newest: dict[str, float] = {}

    def known(self, function_id: str) -> bool:
        return function_id in self._boots

    def newest(self, function_id: str) -> float:
        """The latest ready_at taken: workers ready before it are counted already, or too old to count."""
        return self._newest.get(function_id, -math.inf)

    def seed(self, function_id: str, rows: Iterable[tuple[str, float, float | None]]) -> None:
        """Start a function's history from (worker id, started_at, ready_at) rows, oldest first."""
        self._boots.setdefault(function_id, {})
        for worker_id, started_at, ready_at in rows:
            self.observe(function_id, worker_id, started_at, ready_at)

    def observe(self, function_id: str, worker_id: str, started_at: float, ready_at: float | None) -> None:
        boots = self._boots.setdefault(function_id, {})
        if ready_at is None or worker_id in boots or ready_at < started_at:
            return
        if ready_at < self._newest.get(function_id, -math.inf):
            return  # older than the samples kept (a long-lived worker already counted, or dropped)
        self._newest[function_id] = ready_at
        boots[worker_id] = ready_at - started_at
        while len(boots) > self.keep:
            del boots[next(iter(boots))]
        self._median.pop(function_id, None)

    def estimate(self, function_id: str) -> float | None:
        if function_id in self._median:
            return self._median[function_id]
        xs = sorted((self._boots.get(function_id) or {}).values())
        n = len(xs)
        est = None if n == 0 else xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
        self._median[function_id] = est
        return est


class Estimates:
    """The reconciler's estimates of a function (a mixin: it needs ``cp`` and ``startup_times``)."""

    cp: ControlPlane
    startup_times: StartupTimes

    def _startup_time(self, fid: str, ws: list[Any]) -> float | None:
        """Median launch → ready of the function's recent workers (None before the first is ready). Seeded
        from the database the first time a function is seen, so a restart keeps its history."""
        times = self.startup_times
        if not times.known(fid):
            with self.cp.db.read() as conn:
                rows = conn.execute(
                    select(W.c.id, W.c.started_at, W.c.ready_at)
                    .where(and_(W.c.function_id == fid, W.c.ready_at.is_not(None)))
                    .order_by(W.c.ready_at.desc())
                    .limit(times.keep)
                ).all()
            times.seed(fid, reversed([tuple(r) for r in rows]))
        newest = times.newest(fid)
        for w in sorted(
            (w for w in ws if w.ready_at is not None and w.ready_at >= newest), key=lambda w: w.ready_at
        ):
            times.observe(fid, w.id, w.started_at, w.ready_at)
        return times.estimate(fid)

    def _service_time(self, fid: str) -> float | None:
        """Mean seconds per input on one slot, as the function's workers report it (None until they have)."""
        return self.cp.workers.service_time_estimate(fid)
