"""Control-plane tables as SQLModel classes: one typed row class per table, also usable as the read APIs'
response schemas.

Queries are SQLAlchemy Core on each class's table (``models.apps`` is ``App.__table__``, and so on), whose
column names, types, nullability, defaults and index names ``tests/server/test_models.py`` pins. The schema
changes only through a migration (:mod:`cloudmodal.server.migrations`): ``Database`` upgrades an older
database on start, and a test checks that these classes and the newest migration agree.

States are stored as plain values (``'running'``, ``0``): the columns are ``str``/``int`` and their defaults
the values of the enums in :mod:`.states`, which compare equal to what is read back.
"""

# No ``from __future__ import annotations``: Pydantic would evaluate each field's annotation from its string
# (a compile() per field), which costs a control plane's start more than the classes themselves.
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, MetaData, Table, UniqueConstraint, text
from sqlmodel import Field, SQLModel
from sqlmodel.main import SQLModelConfig

from cloudmodal.server.states import AppState, FunctionState, InputState, OutputStatus, WorkerState


class Row(SQLModel):
    """The tables' base: Pydantic builds a model's validator when it is first used (a read API's response,
    ``model_validate``), not when a control plane imports the tables."""

    model_config = SQLModelConfig(from_attributes=True, defer_build=True)


class Token(Row, table=True):
    """A bearer token, by the hash of its secret (the token itself is never stored)."""

    id: str = Field(primary_key=True)
    name: str = ""
    token_hash: str = Field(index=True, unique=True)  # sha256 hex
    scope: str = "admin"  # "owner", "member" or "worker:<worker id>" (security.py)
    created_at: float = 0.0
    revoked: bool = False


class App(Row, table=True):
    """An app: ephemeral while its client runs it, or deployed (``state``: an :class:`AppState`)."""

    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    state: str = AppState.RUNNING.value
    ephemeral: bool = True
    created_at: float = 0.0
    stopped_at: float | None = None
    client_heartbeat_at: float | None = None
    version: int = 1
    description: str = ""
    tags: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))  # App(tags=...): cost grouping
    budget: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # App(budget=Budget(...))


class Deployment(Row, table=True):
    """One deployment of an app: its version and the functions it deployed."""

    id: int | None = Field(default=None, primary_key=True)
    app_id: str = Field(index=True)
    version: int = 1
    created_at: float = 0.0
    functions: list[str] | None = Field(default=None, sa_column=Column(JSON))


class Function(Row, table=True):
    """A function of an app (``state``: a :class:`FunctionState`), with its wire spec and where its source
    is."""

    id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    name: str  # "f", "Cls", or "Cls(params-hash)" for a parameterized class instance
    parent_id: str | None = None  # class function a parameterized instance belongs to
    spec: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # wire_spec.FunctionSpec
    module: str = ""
    source_name: str | None = None  # file name of the shipped source
    source_blob: str | None = None
    source_dir: str | None = None  # where the source lives on the client's host (local provider)
    pickled_blob: str | None = None  # serialized=True functions, parameters of class instances
    inline_env: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    definition_hash: str = ""
    version: int = 1
    created_at: float = 0.0
    last_active_at: float = 0.0
    state: str = FunctionState.ACTIVE.value


class Call(Row, table=True):
    """One ``.remote()``, ``.map()``, ``.spawn()``… of a function: a batch of inputs."""

    id: str = Field(primary_key=True)
    function_id: str = Field(index=True)
    app_id: str = Field(index=True)
    kind: str = "remote"  # remote | map | spawn | spawn_map | schedule
    created_at: float = 0.0
    num_inputs: int = 0
    cancelled: bool = False
    # who made the call: a token id, or "worker:<id>" for a nested call (only they, and the team-wide
    # identities, read its outputs); NULL for calls made before calls had owners
    created_by: str | None = None


class Input(Row, table=True):
    """One input of a call, in the durable queue (``state``: an :class:`InputState`)."""

    __table_args__ = (
        UniqueConstraint("call_id", "idx"),
        # Partial indexes: only unfinished inputs are ever looked up by state, and finished ones pile up.
        # PostgreSQL's WHERE is added by use_postgresql_partial_indexes().
        Index("ix_input_pending", "function_id", "id", sqlite_where=text("state = 0")),
        Index("ix_input_open", "function_id", "state", sqlite_where=text("state < 2")),
        Index("ix_input_call", "call_id", "state"),
        Index("ix_input_worker", "worker_id", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    call_id: str
    function_id: str
    idx: int
    method: str | None = None
    args: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    args_blob: str | None = None
    state: int = InputState.PENDING.value
    attempts: int = 0  # retries consumed by user exceptions and timeouts
    crashes: int = 0  # worker deaths while running it (never counted against Retries)
    worker_id: str | None = None
    lease_expires: float = 0.0
    available_at: float = 0.0
    created_at: float = 0.0


class Output(Row, table=True):
    """An input's result (``gen_index`` -1), or one item of a generator (``status``: an
    :class:`OutputStatus`)."""

    __table_args__ = (
        UniqueConstraint("input_id", "gen_index"),
        Index("ix_output_call", "call_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    input_id: int
    call_id: str
    idx: int
    gen_index: int = -1  # -1: the input's final output; 0..n: generator items
    status: str = OutputStatus.SUCCESS.value
    data: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    data_blob: str | None = None
    created_at: float = 0.0


class Worker(Row, table=True):
    """A worker of a function's pool, from launch to stop (``state``: a :class:`WorkerState`)."""

    id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    function_id: str = Field(index=True)
    provider: str = "local"
    instance_id: str = ""
    state: str = WorkerState.STARTING.value
    function_version: int = 1
    started_at: float = 0.0
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    idle_since: float | None = None
    in_flight: int = 0
    stopped_at: float | None = None
    stop_reason: str | None = None
    offer: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    market: str = "on-demand"
    price_per_hour: float = 0.0
    gpu: str | None = None
    host: str = ""
    pid: int | None = None
    # The provider's WorkerHandle.to_wire(): how a restarted or standby control plane finds the worker's
    # machine again (a cloud node, a local process) to watch and stop it.
    handle: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    launched_at: float | None = None  # when its provider accepted the launch: billing starts here
    billed_until: float | None = None  # how far the cost ledger has accrued its time
    billing_closed: bool = False  # stopped, and its last span (with the billing minimum) is written


class Pool(Row, table=True):
    """A function's workers as a pool: the autoscaler's last decision and the pool's spot market history."""

    function_id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    desired: int = 0  # the autoscaler's last decision
    workers: int = 0  # live workers at that decision
    reason: str = ""
    fallen_back: bool = False  # on on-demand because spot kept failing (see market_state)
    # spot.PoolMarketState.to_wire(): kept across restarts and take-overs
    market_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    updated_at: float = 0.0


class Setting(Row, table=True):
    """A value the control planes sharing this database agree on (``control_plane_id``: the id every cloud
    node they launch is tagged with)."""

    key: str = Field(primary_key=True)
    value: str = ""


class Event(Row, table=True):
    """Something an app's user should be able to see happened (``cloudmodal app events``)."""

    __table_args__ = (Index("ix_event_app", "app_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    app_id: str | None = None
    function_id: str | None = None
    ts: float = 0.0
    kind: str = ""
    message: str = ""
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class Log(Row, table=True):
    """A line a worker printed (``cloudmodal app logs``)."""

    __table_args__ = (Index("ix_log_app", "app_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    app_id: str = ""
    function_id: str | None = None
    worker_id: str | None = None
    call_id: str | None = None
    stream: str = "stdout"
    ts: float = 0.0
    text: str = ""


metadata: MetaData = SQLModel.metadata


def _table(model: type[Row]) -> Table:
    table: Table = model.__table__  # type: ignore[attr-defined]  # set by SQLAlchemy's mapping
    return table


# The tables, for SQLAlchemy Core queries.
tokens = _table(Token)
apps = _table(App)
deployments = _table(Deployment)
functions = _table(Function)
calls = _table(Call)
inputs = _table(Input)
outputs = _table(Output)
workers = _table(Worker)
pools = _table(Pool)
settings = _table(Setting)
events = _table(Event)
logs = _table(Log)


def use_postgresql_partial_indexes() -> None:
    """Give the partial indexes their PostgreSQL ``WHERE`` too. Declared only when PostgreSQL is used:
    naming a ``postgresql_`` option imports that dialect, which an SQLite control plane (the embedded
    default) would pay on every cold start."""
    for index in inputs.indexes:
        where = index.dialect_options["sqlite"]["where"]
        if where is not None:
            index.dialect_kwargs["postgresql_where"] = where


# The state objects' tables (Dict, Queue, Secret, Volume), each kind in a module of its own; imported here so
# that ``metadata`` (what the migrations are checked against) holds them too.
from cloudmodal.server import (  # noqa: E402, F401
    models_kv,
    models_ledger,
    models_sandbox,
    models_schedules,
    models_secrets,
    models_volumes,
)
