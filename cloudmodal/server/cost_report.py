"""Cost reports from the ledger (:mod:`cloudmodal.server.ledger`): totals, breakdowns, spot savings, what runs
now, and each app's budget headroom.

How a report over ``[since, until)`` is read, whatever the ledger's size:

- the whole hours inside the range from the hourly rollup (``ledger_hour``), summed in SQL per
  (app, function, GPU, cloud, market), per hour too only for ``by="day"``;
- the partial hours at the two edges from the spans there (``ix_ledger_span_t0``), each counted for the
  part of it inside the range;
- the time the ledger has not accrued yet (a running worker's last seconds, a stopped worker's last span and
  billing minimum) as the ledger will write it (:func:`cloudmodal.server.ledger.plan`), so a report is
  current to the second.

Money is summed in floating point and rounded to the cent only when shown.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Integer, and_, cast, func, select

from cloudmodal.server import models
from cloudmodal.server.ledger import (
    HOUR,
    HOUR_S,
    LAPP,
    LWORKER,
    ROLLUP_SUMS,
    SPAN,
    WORKER_COLUMNS,
    open_sandboxes,
    plan,
    span_sums,
)
from cloudmodal.server.states import WorkerState

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

A = models.apps
F = models.functions
W = models.workers
BY = ("app", "function", "gpu", "cloud", "market", "day")
SUMS = ROLLUP_SUMS


@dataclass(slots=True)
class Totals:
    cost: float = 0.0
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    idle_seconds: float = 0.0
    idle_cost: float = 0.0
    spot_cost: float = 0.0
    spot_on_demand_cost: float = 0.0
    minimum_cost: float = 0.0
    spot_unpriced_seconds: float = 0.0

    def add(self, other: dict[str, float], share: float = 1.0) -> None:
        for k in (*SUMS, "spot_unpriced_seconds"):
            setattr(self, k, getattr(self, k) + other.get(k, 0.0) * share)

    def view(self) -> dict[str, float]:
        return {
            "cost": round(self.cost, 6),
            "hours": round(self.seconds / HOUR_S, 6),
            "gpu_hours": round(self.gpu_seconds / HOUR_S, 6),
            "idle_hours": round(self.idle_seconds / HOUR_S, 6),
            "idle_cost": round(self.idle_cost, 6),
            "minimum_cost": round(self.minimum_cost, 6),
            "spot_cost": round(self.spot_cost, 6),
            "spot_on_demand_cost": round(self.spot_on_demand_cost, 6),
            "spot_savings": round(self.spot_on_demand_cost - self.spot_cost, 6),
        }


def overlap(t0: float, t1: float, since: float, until: float) -> float:
    """The share of span ``[t0, t1)`` inside ``[since, until)`` (an instant span: 1 or 0)."""
    if t1 <= t0:
        return 1.0 if since <= t0 < until else 0.0
    inside = min(t1, until) - max(t0, since)
    return max(0.0, inside) / (t1 - t0)


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC calendar ``period`` ("day", "week" from Monday, "month") that ``now`` falls in."""
    d = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = d.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 86400.0
    if period == "week":
        start = d.replace(hour=0, minute=0, second=0, microsecond=0)
        start_ts = start.timestamp() - start.weekday() * 86400.0
        return start_ts, start_ts + 7 * 86400.0
    start = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start.timestamp(), end.timestamp()


class CostReports:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    # -- the pieces ----------------------------------------------------------------------------------
    def _names(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Apps and functions by id: the ledger's own record (which outlives a pruned run's rows), then the
        live tables over it."""
        with self.cp.db.read() as conn:
            apps = {
                r.app_id: {"name": r.name, "tags": r.tags or {}, "budget": None, "state": "stopped"}
                for r in conn.execute(select(LAPP.c.app_id, LAPP.c.name, LAPP.c.tags)).all()
            }
            apps |= {
                r.id: {"name": r.name, "tags": r.tags or {}, "budget": r.budget, "state": r.state}
                for r in conn.execute(select(A.c.id, A.c.name, A.c.tags, A.c.budget, A.c.state)).all()
            }
            fns = {
                r.function_id: r.function_name
                for r in conn.execute(select(LWORKER.c.function_id, LWORKER.c.function_name).distinct()).all()
            }
            fns |= {r.id: r.name for r in conn.execute(select(F.c.id, F.c.name)).all()}
        return apps, fns

    def rows(
        self, since: float, until: float, now: float, app_ids: Iterable[str] | None, per_hour: bool
    ) -> list[tuple[dict[str, Any], dict[str, float]]]:
        """``(dimensions, sums)`` pieces making up ``[since, until)``: rollup hours, edge spans, not yet
        accrued time. ``dimensions``: app_id, function_id, gpu, cloud, market, hour."""
        ids = None if app_ids is None else list(app_ids)
        out: list[tuple[dict[str, Any], dict[str, float]]] = []
        first_hour = math.ceil(since / HOUR_S) * HOUR_S
        last_hour = math.floor(until / HOUR_S) * HOUR_S  # whole hours: [first_hour, last_hour)
        dims: list[Any] = [HOUR.c.app_id, HOUR.c.function_id, HOUR.c.gpu, HOUR.c.cloud, HOUR.c.market]
        if per_hour:  # by day: the hours summed per UTC day in SQL (a day's start; hours are never negative)
            day = (
                cast(HOUR.c.hour / 86400.0, Integer)
                if self.cp.db.is_sqlite
                else func.floor(HOUR.c.hour / 86400.0)
            )
            dims.append((day * 86400.0).label("hour"))
        # one snapshot: an accrual committing between the spans' read and the open workers' would otherwise
        # make the report miss (or count twice) the stretch it wrote
        with self.cp.db.snapshot() as conn:
            if first_hour < last_hour:
                where = [HOUR.c.hour >= first_hour, HOUR.c.hour < last_hour]
                if ids is not None:
                    where.append(HOUR.c.app_id.in_(ids))
                q = select(*dims, *(func.sum(getattr(HOUR.c, k)).label(k) for k in SUMS)).where(and_(*where))
                for r in conn.execute(q.group_by(*dims)).mappings():
                    d = {k: r[k] for k in ("app_id", "function_id", "gpu", "cloud", "market")}
                    d["hour"] = r["hour"] if per_hour else first_hour
                    out.append((d, {k: float(r[k] or 0.0) for k in SUMS}))
                edges = [(since, min(first_hour, until)), (max(last_hour, since), until)]
            else:
                edges = [(since, until)]
            for a, b in edges:
                if b <= a:
                    continue
                # spans are at most an hour long and never cross one: those touching [a, b) start after a - 1 h
                where = [SPAN.c.t0 < b, SPAN.c.t0 >= math.floor(a / HOUR_S) * HOUR_S]
                if ids is not None:
                    where.append(SPAN.c.app_id.in_(ids))
                for m in conn.execute(select(SPAN).where(and_(*where))).mappings():
                    span = dict(m)
                    share = overlap(span["t0"], span["t1"], a, b)
                    if share > 0:
                        out.append((_dims(span), {k: v * share for k, v in span_sums(span).items()}))
            open_workers: list[Any] = list(
                conn.execute(
                    select(*WORKER_COLUMNS).where(
                        and_(W.c.billing_closed.is_(False), W.c.launched_at.is_not(None))
                    )
                ).all()
            )
            open_workers += open_sandboxes(conn, now)  # sandboxes' cloud nodes (function "sandbox")
        for w in open_workers:
            if ids is not None and w.app_id not in ids:
                continue
            _end, planned = plan(w, now)
            for p in planned:
                share = overlap(p["t0"], p["t1"], since, until)
                if share > 0:
                    out.append((_dims(p), {k: v * share for k, v in span_sums(p).items()}))
        return out

    def running(self, app_ids: Iterable[str] | None) -> list[dict[str, Any]]:
        ids = None if app_ids is None else set(app_ids)
        with self.cp.db.read() as conn:
            live = conn.execute(
                select(
                    W.c.id,
                    W.c.app_id,
                    W.c.function_id,
                    W.c.gpu,
                    W.c.offer,
                    W.c.market,
                    W.c.price_per_hour,
                    W.c.launched_at,
                    W.c.state,
                    W.c.idle_since,
                ).where(and_(W.c.state != WorkerState.STOPPED, W.c.launched_at.is_not(None)))
            ).all()
            sandboxes = [
                sb for sb in open_sandboxes(conn, time.time()) if sb.state != WorkerState.STOPPED
            ]  # sandboxes' cloud nodes (function "sandbox")
        return [
            {
                "worker_id": w.id,
                "app_id": w.app_id,
                "function_id": w.function_id,
                "gpu": w.gpu or "",
                "cloud": (w.offer or {}).get("cloud", ""),
                "region": (w.offer or {}).get("region", ""),
                "market": w.market,
                "price_per_hour": float(w.price_per_hour or 0.0),
                "since": w.launched_at,
                "state": w.state,
                "idle": w.idle_since is not None,
            }
            for w in [*live, *sandboxes]
            if ids is None or w.app_id in ids
        ]

    def spent(self, app_id: str, since: float, now: float) -> float:
        """What ``app_id`` has cost from ``since`` to ``now`` (budgets)."""
        return sum(s.get("cost", 0.0) for _d, s in self.rows(since, now, now, [app_id], False))

    # -- the report ----------------------------------------------------------------------------------
    def report(
        self,
        *,
        by: str = "app",
        since: float | None = None,
        until: float | None = None,
        app: str | None = None,
        visible: set[str] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """The report for ``visible`` app names (None: every app), or the one app named (or id) ``app``."""
        now = time.time() if now is None else now
        until = now if until is None else min(until, now)
        since = until - 7 * 86400.0 if since is None else since
        apps, fns = self._names()
        ids: set[str] | None = None  # every app, and volumes' storage (no app)
        if visible is not None or app is not None:
            ids = {i for i, a in apps.items() if visible is None or a["name"] in visible}
            if app is not None:
                ids = {i for i in ids if i == app or apps[i]["name"] == app}
        groups: dict[str, Totals] = defaultdict(Totals)
        total = Totals()
        for d, sums in self.rows(since, until, now, ids, by == "day"):
            total.add(sums)
            groups[self._key(by, d, apps, fns)].add(sums)
        running = self.running(ids)
        for r in running:
            r["app"] = apps.get(r["app_id"], {}).get("name", r["app_id"])
            r["function"] = fns.get(r["function_id"], r["function_id"])
        t = total.view()
        out_groups = [
            {"key": k, **v.view(), "share": round(v.cost / total.cost, 6) if total.cost else 0.0}
            for k, v in sorted(groups.items(), key=lambda kv: (-kv[1].cost, kv[0]))
        ]
        notes = []
        if total.spot_unpriced_seconds:
            notes.append(
                f"{total.spot_unpriced_seconds / HOUR_S:.2f} spot hours had no known on-demand price at launch; "
                "their savings are not counted."
            )
        return {
            "currency": "USD",
            "since": since,
            "until": until,
            "generated_at": now,
            "by": by,
            "app": app,
            "total": t,
            "groups": out_groups,
            "running": {
                "per_hour": round(sum(r["price_per_hour"] for r in running), 6),
                "workers": running,
            },
            "budgets": self.budgets(set(apps) if ids is None else ids, apps, now, running),
            "notes": notes,
        }

    def budgets(
        self, ids: set[str], apps: dict[str, dict[str, Any]], now: float, running: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Each budgeted live app's spending in its period and its $/h, against its caps. The spending of
        every app with the same period is read together (one pass over the ledger per period)."""
        budgeted = {
            i: apps[i]["budget"] for i in ids if apps[i].get("budget") and apps[i].get("state") != "stopped"
        }
        spent: dict[str, float] = defaultdict(float)
        for period in sorted({b.get("period", "month") for b in budgeted.values()}):
            group = [i for i, b in budgeted.items() if b.get("period", "month") == period]
            start, _ = period_bounds(period, now)
            for d, sums in self.rows(start, now, now, group, False):
                spent[d["app_id"]] += sums.get("cost", 0.0)
        per_hour: dict[str, float] = defaultdict(float)
        for r in running:
            per_hour[r["app_id"]] += r["price_per_hour"]
        out = []
        for app_id in sorted(budgeted):
            b = budgeted[app_id]
            start, end = period_bounds(b.get("period", "month"), now)
            out.append(
                {
                    "app": apps[app_id]["name"],
                    "app_id": app_id,
                    "period": b.get("period", "month"),
                    "period_start": start,
                    "period_end": end,
                    "max_total": b.get("max_total"),
                    "spent": round(spent[app_id], 6),
                    "headroom": None
                    if b.get("max_total") is None
                    else round(b["max_total"] - spent[app_id], 6),
                    "max_per_hour": b.get("max_per_hour"),
                    "running_per_hour": round(per_hour[app_id], 6),
                    "per_hour_headroom": None
                    if b.get("max_per_hour") is None
                    else round(b["max_per_hour"] - per_hour[app_id], 6),
                }
            )
        return out

    @staticmethod
    def _key(by: str, d: dict[str, Any], apps: dict[str, dict[str, Any]], fns: dict[str, str]) -> str:
        if not d["app_id"] and by in ("app", "function") or by.startswith("tag:") and not d["app_id"]:
            return "(volume storage)"
        app_name = apps.get(d["app_id"], {}).get("name", d["app_id"])
        if by == "app":
            return str(app_name)
        if by == "function":
            return f"{app_name}/{fns.get(d['function_id'], d['function_id'])}"
        if by == "day":
            return datetime.fromtimestamp(d["hour"], UTC).strftime("%Y-%m-%d")
        if by.startswith("tag:"):
            return str(apps.get(d["app_id"], {}).get("tags", {}).get(by[4:], "(untagged)"))
        return str(d.get(by) or ("cpu" if by == "gpu" else "-"))


def _dims(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "app_id": r["app_id"],
        "function_id": r["function_id"],
        "gpu": r["gpu"],
        "cloud": r["cloud"],
        "market": r["market"],
        "hour": math.floor(r["t0"] / HOUR_S) * HOUR_S,
    }
