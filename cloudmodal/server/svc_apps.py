"""Apps and their deployments: create (or redeploy), find, list with their pools, stop, and stop the
ephemeral runs whose client went away."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update

from cloudmodal.exception import InvalidError, NotFoundError
from cloudmodal.server import models, scheduler
from cloudmodal.server.states import AppState, FunctionState
from cloudmodal.server.svc_workers import LIVE_WORKER_STATES

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

A = models.apps
F = models.functions
CA = models.calls
W = models.workers
D = models.deployments
P = models.pools


class Apps:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._stop_failed: set[str] = set()  # abandoned apps whose stop failed (logged once)

    def create_app(
        self,
        app_id: str,
        name: str,
        ephemeral: bool,
        description: str = "",
        tags: dict[str, str] | None = None,
        budget: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create an app (idempotent by id). Deploying a name that is deployed already is a redeploy: the
        same app, its version one higher (``"redeploy": True`` in the answer), with the tags and budget the
        new deployment declares."""
        now = time.time()
        validate_name(name, "App name")
        state = AppState.RUNNING if ephemeral else AppState.DEPLOYED
        with self.cp.db.write() as conn:
            existing = conn.execute(select(A).where(A.c.id == app_id)).first()
            if existing is not None:
                return dict(existing._mapping)
            if not ephemeral:
                dep = conn.execute(
                    select(A).where(
                        and_(A.c.name == name, A.c.ephemeral.is_(False), A.c.state == AppState.DEPLOYED)
                    )
                ).first()
                if dep is not None:  # redeploy: same app, next version
                    version = dep.version + 1
                    conn.execute(
                        update(A).where(A.c.id == dep.id).values(version=version, tags=tags, budget=budget)
                    )
                    return dict(dep._mapping) | {"version": version, "redeploy": True}
            conn.execute(
                A.insert().values(
                    id=app_id,
                    name=name,
                    state=state,
                    ephemeral=ephemeral,
                    created_at=now,
                    client_heartbeat_at=now,
                    version=1,
                    description=description,
                    tags=tags,
                    budget=budget,
                )
            )
        self.cp.activity.event(
            "app.created", f"{'ephemeral' if ephemeral else 'deployed'} app {name!r} created", app_id=app_id
        )
        return {"id": app_id, "name": name, "state": state, "version": 1}

    def record_deployment(self, app_id: str, functions: list[str]) -> int:
        with self.cp.db.write() as conn:
            # the app row locked (PostgreSQL; SQLite writes one at a time anyway): two deploys of one app at
            # once record their deployments in turn, so the second sees the first's schedule rows
            version = conn.execute(
                select(A.c.version).where(A.c.id == app_id).with_for_update()
            ).scalar_one_or_none()
            if version is None:
                raise NotFoundError(f"App {app_id} not found.")
            now = time.time()
            conn.execute(
                D.insert().values(app_id=app_id, version=version, created_at=now, functions=functions)
            )
            # in this transaction: a deployment recorded has its schedules (and a crash leaves neither)
            scheduler.sync_app_schedules(conn, app_id, functions, now)
        self.cp.activity.event(
            "app.deployed", f"version {version} deployed with {len(functions)} functions", app_id=app_id
        )
        return version

    def app_heartbeat(self, app_id: str) -> str:
        """An ephemeral app's client is alive; returns the app's state (a stopped app's client stops)."""
        with self.cp.db.write() as conn:
            conn.execute(update(A).where(A.c.id == app_id).values(client_heartbeat_at=time.time()))
            state = conn.execute(select(A.c.state).where(A.c.id == app_id)).scalar_one_or_none()
        if state is None:
            raise NotFoundError(f"App {app_id} not found.")
        return state

    def find_app(self, name_or_id: str) -> dict[str, Any]:
        """An app by id, or by name: the live one, else the newest."""
        with self.cp.db.read() as conn:
            row = conn.execute(select(A).where(A.c.id == name_or_id)).first()
            if row is None:
                row = conn.execute(
                    select(A)
                    .where(A.c.name == name_or_id)
                    .order_by((A.c.state == AppState.STOPPED).asc(), A.c.created_at.desc())
                ).first()
        if row is None:
            raise NotFoundError(
                f"App {name_or_id!r} not found. `cloudmodal app list` shows the apps there are."
            )
        return dict(row._mapping)

    def stop_app(self, app_id: str, reason: str = "stopped by user") -> None:
        """Stop an app and its functions, and cancel its calls (the reconciler then drains its workers)."""
        with self.cp.db.write() as conn:
            conn.execute(
                update(A)
                .where(and_(A.c.id == app_id, A.c.state != AppState.STOPPED))
                .values(state=AppState.STOPPED, stopped_at=time.time())
            )
            conn.execute(update(F).where(F.c.app_id == app_id).values(state=FunctionState.STOPPED))
            scheduler.delete_app_schedules(conn, app_id)
            call_ids = [r[0] for r in conn.execute(select(CA.c.id).where(CA.c.app_id == app_id)).all()]
        for cid in call_ids:
            self.cp.calls.cancel_call(cid)
        self.cp.activity.event("app.stopped", reason, app_id=app_id)
        self.cp.hub.notify("reconcile")
        if self.cp.web is not None:  # its custom domains, if any, are free from the next request on
            self.cp.web.domains_changed()

    def list_apps(self, include_stopped: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        """The newest apps, each with its pools: workers by state and market, inputs pending and running,
        and the autoscaler's last decision."""
        with self.cp.db.read() as conn:
            q = select(A).order_by(A.c.created_at.desc()).limit(limit)
            if not include_stopped:
                q = q.where(A.c.state != AppState.STOPPED)
            apps = [dict(r._mapping) for r in conn.execute(q).all()]
            fn_rows = conn.execute(select(F.c.id, F.c.app_id, F.c.name, F.c.parent_id, F.c.spec)).all()
            pool_rows = {
                r.function_id: r
                for r in conn.execute(
                    select(P.c.function_id, P.c.desired, P.c.reason, P.c.fallen_back, P.c.market_state)
                ).all()
            }
            runs = scheduler.next_runs(conn)
            worker_rows = conn.execute(
                select(W.c.function_id, W.c.state, W.c.market, func.count())
                .where(W.c.state.in_(LIVE_WORKER_STATES))
                .group_by(W.c.function_id, W.c.state, W.c.market)
            ).all()
        counts = self.cp.queue.counts()
        by_fn: dict[str, dict[str, int]] = {}
        for fid, state, market, n in worker_rows:
            d = by_fn.setdefault(fid, {})
            d[state] = d.get(state, 0) + n
            d[market] = d.get(market, 0) + n
        for a in apps:
            pools = []
            for fid, app_id, name, _parent_id, spec in fn_rows:
                if app_id != a["id"]:
                    continue
                w = by_fn.get(fid, {})
                pending, running = counts.get(fid, (0, 0))
                row = pool_rows.get(fid)
                pools.append(
                    dict(
                        function_id=fid,
                        name=name,
                        gpu=",".join(spec.get("gpu") or []) or "cpu",
                        workers=w,
                        pending=pending,
                        running=running,
                        # the autoscaler's last decision and the pool's market (None before its first)
                        desired=row.desired if row else None,
                        reason=row.reason if row else None,
                        fallen_back=bool(row.fallen_back) if row else False,
                        fallback_reason=(row.market_state or {}).get("fallback_reason") if row else None,
                        # a deployed scheduled function: {"next_run_at", "schedule"}; None otherwise
                        schedule=runs.get(fid),
                    )
                )
            a["pools"] = pools
        return apps

    def history(self, name_or_id: str) -> list[dict[str, Any]]:
        """An app's deployments, newest first."""
        app = self.find_app(name_or_id)
        with self.cp.db.read() as conn:
            rows = conn.execute(select(D).where(D.c.app_id == app["id"]).order_by(D.c.version.desc())).all()
        return [dict(r._mapping) for r in rows]

    def stop_abandoned_apps(self) -> None:
        """Stop the ephemeral apps whose client has been silent longer than ``client_timeout_s``."""
        timeout_s = self.cp.settings.client_timeout_s
        cutoff = time.time() - timeout_s
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(A.c.id).where(
                    and_(
                        A.c.ephemeral.is_(True),
                        A.c.state == AppState.RUNNING,
                        or_(A.c.client_heartbeat_at < cutoff, A.c.client_heartbeat_at.is_(None)),
                    )
                )
            ).all()
        for (app_id,) in rows:
            try:  # one app that cannot be stopped does not keep the others running
                self.stop_app(
                    app_id,
                    reason=f"the client that ran this ephemeral app has been silent for {timeout_s:.0f} s",
                )
            except Exception:
                if app_id not in self._stop_failed:  # once per app, not every tick
                    self._stop_failed.add(app_id)
                    log.exception("stopping abandoned app %s failed", app_id)


def validate_name(name: str, what: str) -> None:
    if not name or len(name) > 64 or not re.fullmatch(r"[a-zA-Z0-9._-]+", name):
        raise InvalidError(
            f"{what} {name!r} is invalid: use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'."
        )
