"""App budgets (``App(budget=cloudmodal.Budget(...))``) enforced where the autoscaler launches workers.

:func:`room` is the rule, pure: how many more workers an app may start now, given its budget, what it spent
in the budget's period, what its running workers cost an hour and what the next one would. :class:`Budgets`
looks those up for the reconciler, and tells the app's caller once when a budget holds its scale-up back (an
event, ``budget.exceeded``, and a line in the app's logs, which ``cloudmodal run`` prints) and once when it lets
go again.

Periods are UTC calendar days, weeks (from Monday) or months, read from the reconciler's clock; what was spent
is the cost ledger's (wall-clock time, as the clouds bill).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select

from cloudmodal.server import models
from cloudmodal.server.cost_report import CostReports, period_bounds
from cloudmodal.server.states import WorkerState

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

W = models.workers
A = models.apps
L = models.logs


@dataclass(frozen=True)
class Room:
    """How many workers may start (None: no limit) and, when fewer than asked, why."""

    workers: int | None
    reason: str = ""


def room(
    budget: dict[str, Any], spent: float, running_per_hour: float, price: float, period_end: float
) -> Room:
    """The workers an app may still start under ``budget``.

    >>> room({"max_total": 10.0}, 10.5, 0.0, 2.0, 0).workers
    0
    >>> room({"max_per_hour": 10.0}, 0.0, 6.0, 2.0, 0).workers
    2
    >>> room({"max_per_hour": 10.0}, 0.0, 0.0, 0.0, 0).workers is None
    True
    """
    max_total = budget.get("max_total")
    if max_total is not None and spent >= max_total:
        return Room(
            0,
            f"its budget of ${max_total:,.2f} a {budget.get('period', 'month')} is spent (${spent:,.2f}); "
            f"scale-up resumes at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(period_end))}",
        )
    max_per_hour = budget.get("max_per_hour")
    if max_per_hour is None or price <= 0:
        return Room(None)
    n = max(0, math.floor((max_per_hour - running_per_hour) / price + 1e-9))
    return Room(
        n,
        f"its workers would cost more than its budget of ${max_per_hour:,.2f}/h "
        f"(running ${running_per_hour:,.2f}/h, the next worker ${price:,.2f}/h)",
    )


class Budgets:
    def __init__(self, cp: ControlPlane, clock: Callable[[], float] = time.time) -> None:
        self.cp = cp
        self.clock = clock
        self._held: dict[str, str] = {}  # app id -> the reason its scale-up is held back (told once)

    def budget_of(self, app_id: str) -> dict[str, Any] | None:
        with self.cp.db.read() as conn:
            b = conn.execute(select(A.c.budget).where(A.c.id == app_id)).scalar()
        return b if b else None

    def allow(
        self, app_id: str, function_id: str, want: int, price_of: Callable[[], float], launching: int
    ) -> int:
        """How many of the ``want`` workers of ``function_id`` may start now (all of them without a budget).
        ``price_of()``: the next worker's $/h (ranked only for an app with a budget)."""
        budget = self.budget_of(app_id)
        if not budget or want <= 0:
            self._release(app_id, function_id)
            return want
        price = price_of()
        start, end = period_bounds(budget.get("period", "month"), self.clock())
        spent = CostReports(self.cp).spent(app_id, start, time.time())
        with self.cp.db.read() as conn:
            running = conn.execute(
                select(func.coalesce(func.sum(W.c.price_per_hour), 0.0)).where(
                    and_(W.c.app_id == app_id, W.c.state != WorkerState.STOPPED)
                )
            ).scalar()
        r = room(budget, spent, float(running or 0.0) + launching * price, price, end)
        if r.workers is None or r.workers >= want:
            self._release(app_id, function_id)
            return want
        if self._held.get(app_id) != r.reason:
            self._held[app_id] = r.reason
            msg = f"budget: not starting {want - r.workers} more worker(s): {r.reason}"
            self._log(app_id, function_id, msg)  # before the event: whoever sees the event finds the line
            self.cp.activity.event(
                "budget.exceeded", msg, app_id=app_id, function_id=function_id, held=want - r.workers
            )
        return r.workers

    def _release(self, app_id: str, function_id: str) -> None:
        if self._held.pop(app_id, None) is not None:
            msg = "budget: scale-up resumes"
            self._log(app_id, function_id, msg)
            self.cp.activity.event("budget.resumed", msg, app_id=app_id, function_id=function_id)

    def _log(self, app_id: str, function_id: str, text: str) -> None:
        with self.cp.db.write() as conn:
            conn.execute(
                L.insert().values(
                    app_id=app_id,
                    function_id=function_id,
                    worker_id=None,
                    stream="stderr",
                    ts=time.time(),
                    text=text,
                )
            )
        self.cp.hub.notify(f"logs:{app_id}")
