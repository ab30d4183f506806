"""The table of deployed functions' schedules (``@app.function(schedule=Period(...) | Cron(...))``).

Imported by :mod:`cloudmodal.server.models` (so one ``metadata`` holds every table); created by migration 0007.
One row per scheduled function of a deployed app, written when the deployment is recorded and deleted when
the app stops. ``next_fire_at`` is the tick the scheduler fires next: firing advances it by compare-and-swap
in the transaction that creates the call (see :mod:`cloudmodal.server.scheduler`), so it is also the lease
that makes each tick fire once whatever the number of control planes.
"""

# No ``from __future__ import annotations``: see models.py (SQLModel evaluates the annotations).
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field

from cloudmodal.server.models import Row


class FunctionSchedule(Row, table=True):
    """A deployed function's schedule and the next tick it fires."""

    __tablename__ = "schedule"
    __table_args__ = (Index("ix_schedule_due", "next_fire_at"),)

    function_id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    # Period.to_wire() / Cron.to_wire(), as the function's spec holds it
    schedule: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    anchor: float = 0.0  # when the schedule began (the deploy that set it): a Period counts from it
    next_fire_at: float = 0.0  # the next tick, epoch seconds
    last_fired_at: float | None = None  # the tick last fired (not when: that is its call's created_at)
    last_call_id: str | None = None
    updated_at: float = 0.0
