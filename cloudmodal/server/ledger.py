"""The cost ledger's writer: each launched worker's time, at the $/h fixed when it launched, as spans.

:meth:`Ledger.accrue` (run by the reconciling control plane every ``CLOUDMODAL_LEDGER_ACCRUAL_S`` and soon
after a worker stops) writes, for every worker whose billing is open, its time from where the ledger got to
(``billed_until``, else ``launched_at``: when its provider accepted the launch) to now, or to its end
(``stopped_at``). A stopped worker's last accrual adds the top-up of its cloud's billing minimum and increment
(:mod:`cloudmodal.pricing.billing`) and closes it.

- The price is the worker row's ``price_per_hour`` (fixed at launch) and the on-demand price its offer had
  then: a catalog change never changes what the ledger says.
- Spans never cross an hour boundary and each updates its hour's rollup (``ledger_hour``) in the same
  transaction, so a report reads a handful of rows per hour.
- The idle part of a span (the worker had no input nor request since ``idle_since``) is counted: a warm pool's
  idle time is charged to the app that kept it warm, and shown as such.
- Exactly once: each worker's accrual moves its ``billed_until`` by compare-and-swap in the transaction that
  writes its spans, so two control planes (or a retry) never write a stretch twice.

Workers of the local provider cost nothing unless a price is configured; their time is recorded all the
same (hours, GPU-hours).

Sandboxes on cloud nodes (``Sandbox.create(gpu=...)``) are billed as workers are, under the function name
``sandbox`` of their app: the control plane that launched the node writes what it is billed as into the
sandbox's row when the node is accepted (``spec["billing"]``: provider, offer, market, $/h fixed at launch,
``launched_at``) and when the node is deleted (``stopped_at``); :meth:`Ledger.accrue` writes its spans keyed by
the sandbox's id, from the last one's end (read in the writing transaction; the spans' unique key
``(worker_id, t0, kind)`` refuses a stretch written twice), and closes it with a ``ledger_worker`` row (its
primary key: once). A node whose deletion was never recorded (its control plane went away) is billed to the
sandbox's end plus :data:`SANDBOX_NODE_GRACE_S`. Sandboxes on the control plane's machine cost nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from cloudmodal.pricing.billing import billed_seconds
from cloudmodal.server import models
from cloudmodal.server.models_ledger import LedgerApp, LedgerHour, LedgerSpan, LedgerWorker
from cloudmodal.server.models_sandbox import SandboxRow
from cloudmodal.server.states import WorkerState

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.ledger")

W = models.workers
SPAN = LedgerSpan.__table__  # type: ignore[attr-defined]
HOUR = LedgerHour.__table__  # type: ignore[attr-defined]
LWORKER = LedgerWorker.__table__  # type: ignore[attr-defined]
LAPP = LedgerApp.__table__  # type: ignore[attr-defined]
A = models.apps
F = models.functions
HOUR_S = 3600.0
CHUNK = 200  # workers accrued in one transaction
MONTH_HOURS = 730.5  # the clouds' storage prices are per month: 365.25 * 24 / 12 hours
SB = SandboxRow.__table__  # type: ignore[attr-defined]
SANDBOX_FUNCTION = "sandbox"  # the function id and name a sandbox's node is billed under
SANDBOX_NODE_GRACE_S = (
    60.0  # an ended sandbox whose node's deletion was never recorded: billed this much after
)
SANDBOX_WINDOW_S = 7 * 86400.0  # ended sandboxes looked at for billing to close (their nodes' deletion)

WORKER_COLUMNS = (
    W.c.id,
    W.c.app_id,
    W.c.function_id,
    W.c.provider,
    W.c.state,
    W.c.started_at,
    W.c.launched_at,
    W.c.billed_until,
    W.c.stopped_at,
    W.c.idle_since,
    W.c.offer,
    W.c.market,
    W.c.price_per_hour,
    W.c.gpu,
    W.c.last_heartbeat,
    W.c.stop_reason,
)


@dataclass(frozen=True)
class Billed:
    """What one worker is billed as: fixed when it launched."""

    provider: str
    cloud: str
    region: str
    instance_type: str
    gpu: str
    gpu_count: int
    market: str
    price_per_hour: float
    on_demand_per_hour: float | None

    @classmethod
    def of(cls, w: Any) -> Billed:
        offer = w.offer or {}
        gpu = w.gpu or offer.get("gpu") or ""
        return cls(
            provider=w.provider or "",
            cloud=offer.get("cloud") or ("" if w.provider == "local" else w.provider or ""),
            region=offer.get("region") or "",
            instance_type=offer.get("instance_type") or "",
            gpu=gpu,
            gpu_count=_gpu_count(gpu),
            market=w.market or "on-demand",
            price_per_hour=float(w.price_per_hour or 0.0),
            on_demand_per_hour=_on_demand(offer, w.market, w.price_per_hour),
        )


def _gpu_count(tier: str) -> int:
    if not tier:
        return 0
    _, _, n = tier.partition(":")
    return int(n) if n.isdigit() else 1


def _on_demand(offer: dict[str, Any], market: str | None, price: float | None) -> float | None:
    if market != "spot":
        return float(price or 0.0)
    od = offer.get("on_demand_per_hour")
    return float(od) if od is not None else None


def hours_between(t0: float, t1: float) -> list[tuple[float, float]]:
    """``[t0, t1)`` cut at every hour boundary.

    >>> hours_between(3500.0, 7300.0)
    [(3500.0, 3600.0), (3600.0, 7200.0), (7200.0, 7300.0)]
    """
    out = []
    t = t0
    while t < t1:
        end = min(t1, (math.floor(t / HOUR_S) + 1) * HOUR_S)
        out.append((t, end))
        t = end
    return out


class Ledger:
    def __init__(self, cp: ControlPlane, interval_s: float = 30.0) -> None:
        self.cp = cp
        self.interval_s = interval_s
        self.last_accrual = 0.0
        self._soon = False

    def soon(self) -> None:
        """A worker stopped: accrue at the next chance rather than at the next interval (any thread)."""
        self._soon = True

    def due(self, now: float) -> bool:
        return self._soon or now - self.last_accrual >= self.interval_s

    def accrue(self, now: float | None = None) -> int:
        """Accrue every open worker up to ``now`` (or its end); the number of spans written."""
        now = time.time() if now is None else now
        self.last_accrual = now
        self._soon = False
        with self.cp.db.read() as conn:
            open_workers = conn.execute(
                select(*WORKER_COLUMNS).where(
                    and_(W.c.billing_closed.is_(False), W.c.launched_at.is_not(None))
                )
            ).all()
        written = 0
        if open_workers:
            self._name_apps({w.app_id for w in open_workers}, now)
        # workers accrued CHUNK to a transaction (one commit, one disk flush, for all of them); a chunk that
        # fails is accrued again worker by worker, so one bad row never holds the others back
        for i in range(0, len(open_workers), CHUNK):
            chunk = open_workers[i : i + CHUNK]
            try:
                with self.cp.db.write() as conn:
                    written += sum(self._accrue_worker(conn, w, now) for w in chunk)
                continue
            except Exception:
                if len(chunk) == 1:
                    log.exception(
                        "accruing worker %s failed; it is tried again on the next accrual", chunk[0].id
                    )
                    continue
            for w in chunk:
                try:
                    with self.cp.db.write() as conn:
                        written += self._accrue_worker(conn, w, now)
                except Exception:
                    log.exception("accruing worker %s failed; it is tried again on the next accrual", w.id)
        with self.cp.db.read() as conn:
            sandboxes = open_sandboxes(conn, now)
        for sb in sandboxes:
            try:
                with self.cp.db.write() as conn:
                    written += self._accrue_sandbox(conn, sb, now)
            except IntegrityError:
                pass  # another accrual wrote this stretch first (the spans' unique key)
            except Exception:
                log.exception("accruing sandbox %s failed; it is tried again on the next accrual", sb.id)
        try:
            written += self.accrue_storage(now)
        except Exception:
            log.exception("accruing volume storage failed; it is tried again on the next accrual")
        return written

    def accrue_storage(self, now: float) -> int:
        """Volumes' storage, by the hour (GB-month at their store's list price; none for a local directory):
        the head version's size from its manifest. Older versions' parts that only retention keeps, and the
        store's request charges, are not counted."""
        import os

        from cloudmodal.pricing.billing import STORAGE_USD_PER_GB_MONTH
        from cloudmodal.pricing.egress import GIB
        from cloudmodal.server.models_volumes import volumes as V
        from cloudmodal.server.svc_volumes import Volumes
        from cloudmodal.server.volume_locality import _version_bytes, volume_data_location
        from cloudmodal.settings import settings

        s = settings()
        configured = Volumes(self.cp, s.volume_store).store_url
        with self.cp.db.read() as conn:
            vols = conn.execute(select(V)).all()
            last: dict[str, float] = dict(
                conn.execute(
                    select(SPAN.c.worker_id, func.max(SPAN.c.t1))
                    .where(SPAN.c.kind == "storage")
                    .group_by(SPAN.c.worker_id)
                ).all()
            )
        written = 0
        for v in vols:
            where = volume_data_location(v.store_url, configured, s.volume_store_region, os.environ)
            price = STORAGE_USD_PER_GB_MONTH.get(where.cloud or "")
            if price is None:
                continue
            key = f"volume:{v.id}"
            start = float(last.get(key) or v.created_at)
            if now - start < HOUR_S:
                continue
            size, _why = _version_bytes(v)
            if size is None:
                continue
            gb = size / GIB
            per_hour = gb * price / MONTH_HOURS
            rows = [
                {
                    "worker_id": key,
                    "app_id": "",
                    "function_id": "",
                    "provider": "volume",
                    "cloud": where.cloud or "",
                    "region": where.region or "",
                    "instance_type": v.name or v.id,
                    "gpu": "",
                    "gpu_count": 0,
                    "market": "storage",
                    "price_per_hour": per_hour,
                    "on_demand_per_hour": per_hour,
                    "t0": t0,
                    "t1": t1,
                    "seconds": t1 - t0,
                    "idle_seconds": 0.0,
                    "cost": per_hour * (t1 - t0) / HOUR_S,
                    "kind": "storage",
                    "recorded_at": now,
                }
                for t0, t1 in hours_between(start, math.floor(now / HOUR_S) * HOUR_S)
            ]
            if not rows:
                continue
            with self.cp.db.write() as conn:
                taken = conn.execute(
                    select(SPAN.c.id).where(
                        and_(SPAN.c.worker_id == key, SPAN.c.kind == "storage", SPAN.c.t1 > start)
                    )
                ).first()
                if taken is not None:
                    continue  # another accrual wrote these hours (the unique key would refuse them anyway)
                conn.execute(SPAN.insert(), rows)
                for r in rows:
                    _add_to_hour(conn, self.cp.db.is_sqlite, r)
            written += len(rows)
        return written

    def _accrue_worker(self, conn: Connection, w: Any, now: float) -> int:
        """Accrue one worker in the caller's transaction; the number of spans written."""
        end, rows = plan(w, now)
        if end is None:
            return 0
        stopped = w.state == WorkerState.STOPPED
        moved = conn.execute(
            update(W)
            .where(
                and_(
                    W.c.id == w.id,
                    W.c.billing_closed.is_(False),
                    W.c.billed_until.is_(None)
                    if w.billed_until is None
                    else W.c.billed_until == w.billed_until,
                )
            )
            .values(billed_until=end, billing_closed=stopped)
        ).rowcount
        if not moved:
            return 0  # another accrual got there first
        if rows:
            conn.execute(SPAN.insert(), rows)
            for r in rows:
                _add_to_hour(conn, self.cp.db.is_sqlite, r)
        if stopped:
            self._close(conn, w, end)
        return len(rows)

    def _accrue_sandbox(self, conn: Connection, sb: Any, now: float) -> int:
        """Accrue one sandbox's node in the caller's transaction (see the module's docstring)."""
        sb.billed_until = conn.execute(
            select(func.max(SPAN.c.t1)).where(and_(SPAN.c.worker_id == sb.id, SPAN.c.kind == "compute"))
        ).scalar()
        end, rows = plan(sb, now)
        if end is None:
            return 0
        if rows:
            conn.execute(SPAN.insert(), rows)
            for r in rows:
                _add_to_hour(conn, self.cp.db.is_sqlite, r)
        if sb.state == WorkerState.STOPPED:
            self._close(conn, sb, end)
        return len(rows)

    def _close(self, conn: Connection, w: Any, end: float) -> None:
        """The worker's whole life in ``ledger_worker``, in its last accrual's transaction."""
        totals = conn.execute(
            select(
                func.coalesce(func.sum(SPAN.c.seconds), 0.0), func.coalesce(func.sum(SPAN.c.cost), 0.0)
            ).where(SPAN.c.worker_id == w.id)
        ).one()
        b = Billed.of(w)
        name = (
            SANDBOX_FUNCTION
            if w.function_id == SANDBOX_FUNCTION
            else conn.execute(select(F.c.name).where(F.c.id == w.function_id)).scalar() or ""
        )
        conn.execute(
            LWORKER.insert().values(
                worker_id=w.id,
                app_id=w.app_id,
                function_id=w.function_id,
                function_name=name,
                provider=b.provider,
                cloud=b.cloud,
                region=b.region,
                instance_type=b.instance_type,
                gpu=b.gpu,
                market=b.market,
                price_per_hour=b.price_per_hour,
                on_demand_per_hour=b.on_demand_per_hour,
                started_at=float(w.started_at or 0.0),
                launched_at=float(w.launched_at),
                last_heartbeat=w.last_heartbeat,
                stopped_at=end,
                stop_reason=w.stop_reason or "",
                billed_seconds=float(totals[0]),
                cost=float(totals[1]),
            )
        )

    def _name_apps(self, app_ids: set[str], now: float) -> None:
        """Keep each app's name and tags in ``ledger_app`` (retention removes a stopped run's app row; its
        costs keep their name)."""
        with self.cp.db.read() as conn:
            apps = conn.execute(
                select(A.c.id, A.c.name, A.c.tags, A.c.ephemeral).where(A.c.id.in_(sorted(app_ids)))
            ).all()
            known = {
                r.app_id: (r.name, r.tags)
                for r in conn.execute(
                    select(LAPP.c.app_id, LAPP.c.name, LAPP.c.tags).where(LAPP.c.app_id.in_(sorted(app_ids)))
                )
            }
        changed = [a for a in apps if known.get(a.id) != (a.name, a.tags)]
        if not changed:
            return
        if self.cp.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        with self.cp.db.write() as conn:
            for a in changed:
                values = {"name": a.name, "tags": a.tags, "ephemeral": bool(a.ephemeral)}
                # an upsert: another control plane on the same database may name the same app at the same time
                stmt = insert(LAPP).values(app_id=a.id, first_seen=now, **values)
                conn.execute(stmt.on_conflict_do_update(index_elements=["app_id"], set_=values))


def open_sandboxes(conn: Connection, now: float) -> list[Any]:
    """The sandboxes on cloud nodes whose billing is open, as worker-like rows for :func:`plan` (with
    ``billed_until``: their last compute span's end, as ``conn`` sees it)."""
    rows = conn.execute(
        select(SB.c.id, SB.c.app_id, SB.c.state, SB.c.finished_at, SB.c.spec).where(
            and_(
                or_(SB.c.state == "running", SB.c.finished_at >= now - SANDBOX_WINDOW_S),
                SB.c.id.not_in(select(LWORKER.c.worker_id)),
            )
        )
    ).all()
    out = [w for r in rows if (w := sandbox_worker(r, now)) is not None]
    if out:
        billed: dict[str, float] = dict(
            conn.execute(
                select(SPAN.c.worker_id, func.max(SPAN.c.t1))
                .where(and_(SPAN.c.worker_id.in_([w.id for w in out]), SPAN.c.kind == "compute"))
                .group_by(SPAN.c.worker_id)
            ).all()
        )
        for w in out:
            w.billed_until = billed.get(w.id)
    return out


def sandbox_worker(r: Any, now: float) -> Any | None:
    """A sandbox row (``id``, ``app_id``, ``state``, ``finished_at``, ``spec``) as :data:`WORKER_COLUMNS` has a
    worker, when it ran on a cloud node (None otherwise). ``billed_until`` is None: the caller reads it."""
    b = (r.spec or {}).get("billing")
    if not b or b.get("launched_at") is None:
        return None
    stopped_at = b.get("stopped_at")
    if stopped_at is None and r.state != "running" and r.finished_at is not None:
        if now - float(r.finished_at) > SANDBOX_NODE_GRACE_S:  # its node's deletion was never recorded
            stopped_at = float(r.finished_at) + SANDBOX_NODE_GRACE_S
    return SimpleNamespace(
        id=r.id,
        app_id=r.app_id,
        function_id=SANDBOX_FUNCTION,
        provider=b.get("provider") or "",
        state=WorkerState.STOPPED if stopped_at is not None else WorkerState.READY,
        started_at=float(b["launched_at"]),
        launched_at=float(b["launched_at"]),
        billed_until=None,
        stopped_at=stopped_at,
        idle_since=None,
        offer=b.get("offer") or {},
        market=b.get("market") or "on-demand",
        price_per_hour=float(b.get("price_per_hour") or 0.0),
        gpu=b.get("gpu") or "",
        last_heartbeat=None,
        stop_reason="sandbox ended",
    )


def plan(w: Any, now: float) -> tuple[float | None, list[dict[str, Any]]]:
    """What accruing worker row ``w`` (``WORKER_COLUMNS``) at ``now`` writes: ``(new billed_until, span
    rows)``, or ``(None, [])`` when there is nothing yet. Pure: the report uses it for the time not accrued."""
    launched = float(w.launched_at)
    start = float(w.billed_until) if w.billed_until is not None else launched
    stopped = w.state == WorkerState.STOPPED
    end = float(w.stopped_at or now) if stopped else now
    end = max(end, start)
    if not stopped and end - start < 1.0:
        return None, []  # nothing worth a row yet
    billed = Billed.of(w)
    idle_from = float(w.idle_since) if w.idle_since is not None else None
    rows = []
    for t0, t1 in hours_between(start, end):
        idle = max(0.0, t1 - max(t0, idle_from)) if idle_from is not None else 0.0
        rows.append(_span(w, billed, t0, t1, t1 - t0, idle, "compute", now))
    if stopped:
        ran = end - launched
        top_up = billed_seconds(billed.cloud, ran) - ran
        if top_up > 1e-9:
            rows.append(_span(w, billed, end, end, top_up, 0.0, "minimum", now))
    return end, rows


def _span(
    w: Any, b: Billed, t0: float, t1: float, seconds: float, idle: float, kind: str, now: float
) -> dict[str, Any]:
    return {
        "worker_id": w.id,
        "app_id": w.app_id,
        "function_id": w.function_id,
        "provider": b.provider,
        "cloud": b.cloud,
        "region": b.region,
        "instance_type": b.instance_type,
        "gpu": b.gpu,
        "gpu_count": b.gpu_count,
        "market": b.market,
        "price_per_hour": b.price_per_hour,
        "on_demand_per_hour": b.on_demand_per_hour,
        "t0": t0,
        "t1": t1,
        "seconds": seconds,
        "idle_seconds": idle,
        "cost": b.price_per_hour * seconds / HOUR_S,
        "kind": kind,
        "recorded_at": now,
    }


ROLLUP_SUMS = (
    "cost",
    "seconds",
    "gpu_seconds",
    "idle_seconds",
    "idle_cost",
    "spot_cost",
    "spot_on_demand_cost",
    "minimum_cost",
)  # the columns of ledger_hour a span adds to (and ``spans``, its count)


def span_sums(r: dict[str, Any]) -> dict[str, float]:
    """A span's (or a planned span's) contribution: what the hourly rollup adds up, and the spot seconds whose
    savings cannot be counted (no on-demand price known at launch)."""
    spot_known = r["market"] == "spot" and r["on_demand_per_hour"] is not None
    return {
        "cost": r["cost"],
        "seconds": 0.0 if r["kind"] == "storage" else r["seconds"],  # hours are machines' hours
        "gpu_seconds": r["seconds"] * r["gpu_count"],
        "idle_seconds": r["idle_seconds"],
        "idle_cost": r["price_per_hour"] * r["idle_seconds"] / HOUR_S,
        "spot_cost": r["cost"] if spot_known else 0.0,
        "spot_on_demand_cost": r["on_demand_per_hour"] * r["seconds"] / HOUR_S if spot_known else 0.0,
        "minimum_cost": r["cost"] if r["kind"] == "minimum" else 0.0,
        "spot_unpriced_seconds": r["seconds"] if r["market"] == "spot" and not spot_known else 0.0,
    }


def _add_to_hour(conn: Connection, sqlite: bool, r: dict[str, Any]) -> None:
    """Add span ``r`` to its hour's rollup row (made if missing)."""
    sums = span_sums(r)
    delta = {k: sums[k] for k in ROLLUP_SUMS} | {"spans": 1}
    key = {
        "hour": math.floor(r["t0"] / HOUR_S) * HOUR_S,
        "app_id": r["app_id"],
        "function_id": r["function_id"],
        "gpu": r["gpu"],
        "cloud": r["cloud"],
        "market": r["market"],
    }
    if sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    stmt = insert(HOUR).values(**key, **delta)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={k: getattr(HOUR.c, k) + getattr(stmt.excluded, k) for k in delta},
    )
    conn.execute(stmt)
