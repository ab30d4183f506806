"""The cost routes: ``GET /v1/cost`` (the report ``cloudmodal cost`` and the dashboard read). Added to the
control plane's route table by :func:`cloudmodal.server.api.build_routes`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from cloudmodal import exception as exc
from cloudmodal.server.cost_report import BY, CostReports
from cloudmodal.server.security import Identity

Epoch = Annotated[float, Field(ge=0, le=1e11)]


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)``; ``run(fn, *args)`` runs blocking
    work off the event loop."""
    reports = CostReports(cp)
    cp.cost = reports

    @route("GET", "/v1/cost", "member")
    async def cost(
        who: Identity,
        by: str = "app",
        since: Epoch | None = None,
        until: Epoch | None = None,
        app: str | None = None,
    ) -> Any:
        """The cost report over ``[since, until)`` (default: the last 7 days), grouped ``by`` app, function,
        gpu, cloud, market, day or ``tag:KEY``; with ``app``, that app only. A member token scoped to apps
        sees only those."""
        if by not in BY and not (by.startswith("tag:") and 4 < len(by) <= 67):
            raise exc.InvalidError(f"by={by!r}: group by one of {', '.join(BY)}, or tag:KEY (an app tag).")
        if since is not None and until is not None and since >= until:
            raise exc.InvalidError("since must be before until.")
        visible = None if who.team_wide else set(who.apps or ())
        return await run(lambda: reports.report(by=by, since=since, until=until, app=app, visible=visible))
