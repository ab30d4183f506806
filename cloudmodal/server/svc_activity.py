"""An app's activity as users read it (``cloudmodal app events``, ``cloudmodal app logs``): the control plane's
events, and the lines its workers print. Both are appended, paged by id, and announced on the hub so that
followers wake at once."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select

from cloudmodal.server import models

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

E = models.events
L = models.logs
W = models.workers


class Activity:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    # -- events ------------------------------------------------------------------------------------------
    def event(
        self,
        kind: str,
        message: str,
        *,
        app_id: str | None = None,
        function_id: str | None = None,
        **data: Any,
    ) -> None:
        with self.cp.db.write() as conn:
            conn.execute(
                E.insert().values(
                    app_id=app_id,
                    function_id=function_id,
                    ts=time.time(),
                    kind=kind,
                    message=message,
                    data=data or None,
                )
            )
        log.info("%s %s: %s", app_id or "-", kind, message)
        if app_id:
            self.cp.hub.notify(f"events:{app_id}")

    def events(self, app_id: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(E.c.id, E.c.ts, E.c.kind, E.c.function_id, E.c.message, E.c.data)
                .where(and_(E.c.app_id == app_id, E.c.id > after))
                .order_by(E.c.id)
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    # -- workers' output ---------------------------------------------------------------------------------
    def add_logs(self, worker_id: str, lines: list[list[Any]]) -> None:
        """Store a worker's ``[ts, stream, text, call_id]`` lines under its app and function."""
        if not lines:
            return
        with self.cp.db.read() as conn:
            row = conn.execute(select(W.c.app_id, W.c.function_id).where(W.c.id == worker_id)).first()
        if row is None:
            return
        with self.cp.db.write() as conn:
            conn.execute(
                L.insert(),
                [
                    dict(
                        app_id=row.app_id,
                        function_id=row.function_id,
                        worker_id=worker_id,
                        ts=ts,
                        stream=stream,
                        text=text,
                        call_id=call_id,
                    )
                    for ts, stream, text, call_id in lines
                ],
            )
        self.cp.hub.notify(f"logs:{row.app_id}")

    def logs(self, app_id: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self.cp.db.read() as conn:
            rows = conn.execute(
                select(L.c.id, L.c.ts, L.c.stream, L.c.text, L.c.function_id, L.c.worker_id, L.c.call_id)
                .where(and_(L.c.app_id == app_id, L.c.id > after))
                .order_by(L.c.id)
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]
