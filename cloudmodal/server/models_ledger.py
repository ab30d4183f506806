"""The cost ledger's tables: what each worker cost, kept apart from the call history that retention prunes.

Imported by :mod:`cloudmodal.server.models` (one ``metadata``); created by migration 0009. Written by
:mod:`cloudmodal.server.ledger`, read by :mod:`cloudmodal.server.cost_report`.

- ``ledger_span``: append-only. One row per stretch of one worker's billed time at the $/h fixed when it
  launched (``kind="compute"``), never longer than an hour and never across an hour boundary, and at its end
  the top-up its cloud's billing minimum or increment adds (``kind="minimum"``). Unique on
  ``(worker_id, t0, kind)``: a span written twice (a retried accrual, two control planes) is written once.
- ``ledger_hour``: the spans summed per hour and (app, function, GPU, cloud, market), updated in the span's
  transaction. Reports read it instead of the spans (an hour's rows are a handful whatever the number of
  spans), and the spans only for the partial hours at the edges of a report's range.
"""

# No ``from __future__ import annotations``: see models.py (SQLModel evaluates the annotations).

from sqlalchemy import JSON, Column, Index, PrimaryKeyConstraint, UniqueConstraint
from sqlmodel import Field

from cloudmodal.server.models import Row


class LedgerSpan(Row, table=True):
    """A stretch of one worker's billed time."""

    __tablename__ = "ledger_span"
    __table_args__ = (
        UniqueConstraint("worker_id", "t0", "kind", name="uq_ledger_span_worker_t0_kind"),
        Index("ix_ledger_span_t0", "t0"),
        Index("ix_ledger_span_app_t0", "app_id", "t0"),
    )

    id: int | None = Field(default=None, primary_key=True)
    worker_id: str
    app_id: str
    function_id: str
    provider: str  # the provider that launched it: local, sim, aws...
    cloud: str  # the offer's cloud ("" for none: local)
    region: str = ""
    instance_type: str = ""
    gpu: str = ""  # the GPU tier it ran, "H100:8" ("" for CPU)
    gpu_count: int = 0
    market: str = "on-demand"
    price_per_hour: float = 0.0  # fixed at launch
    on_demand_per_hour: float | None = None  # the same offer's on-demand $/h at launch (spot savings)
    t0: float = 0.0
    t1: float = 0.0
    seconds: float = 0.0  # billed seconds: t1 - t0, or the minimum's top-up
    idle_seconds: float = 0.0  # of which the worker sat idle in its warm pool
    cost: float = 0.0  # USD: price_per_hour * seconds / 3600
    kind: str = "compute"  # compute | minimum
    recorded_at: float = 0.0


class LedgerHour(Row, table=True):
    """The spans of one hour, summed per app, function, GPU tier, cloud and market."""

    __tablename__ = "ledger_hour"
    __table_args__ = (
        PrimaryKeyConstraint(
            "hour", "app_id", "function_id", "gpu", "cloud", "market", name="pk_ledger_hour"
        ),
        Index("ix_ledger_hour_app", "app_id", "hour"),
    )

    hour: float  # the hour's start, epoch seconds (a multiple of 3600)
    app_id: str
    function_id: str
    gpu: str
    cloud: str
    market: str
    cost: float = 0.0
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    idle_seconds: float = 0.0
    idle_cost: float = 0.0
    spot_cost: float = 0.0  # the cost of spot spans whose on-demand price is known...
    spot_on_demand_cost: float = 0.0  # ...and what the same seconds would have cost on demand
    minimum_cost: float = 0.0  # of ``cost``, what billing minimums and increments added
    spans: int = 0


class LedgerWorker(Row, table=True):
    """One worker's whole billed life, written once when its billing closes: what it ran on, from when to
    when, why it ended, and what it cost. Kept when retention removes the worker's own row."""

    __tablename__ = "ledger_worker"
    __table_args__ = (Index("ix_ledger_worker_app", "app_id", "stopped_at"),)

    worker_id: str = Field(primary_key=True)
    app_id: str
    function_id: str
    function_name: str = ""
    provider: str = ""
    cloud: str = ""
    region: str = ""
    instance_type: str = ""
    gpu: str = ""
    market: str = ""
    price_per_hour: float = 0.0
    on_demand_per_hour: float | None = None
    started_at: float = 0.0  # asked for
    launched_at: float = 0.0  # its provider accepted the launch: billed from here
    last_heartbeat: float | None = None
    stopped_at: float = 0.0
    stop_reason: str = ""
    billed_seconds: float = 0.0  # with its cloud's minimum
    cost: float = 0.0


class LedgerApp(Row, table=True):
    """An app as the ledger names it (name, tags), kept when retention removes a stopped run's app row."""

    __tablename__ = "ledger_app"

    app_id: str = Field(primary_key=True)
    name: str = ""
    tags: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    ephemeral: bool = True
    first_seen: float = 0.0
