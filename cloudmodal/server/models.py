"""Control-plane tables (SQLModel). Hot-path queue operations use SQLAlchemy Core on these tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel


class Token(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str = ""
    token_hash: str = Field(index=True, unique=True)  # sha256 hex; the token itself is never stored
    scope: str = "admin"  # "admin" or "worker:<worker id>"
    created_at: float = 0.0
    revoked: bool = False


class App(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str = Field(index=True)
    state: str = "running"  # running | deployed | stopped
    ephemeral: bool = True
    created_at: float = 0.0
    stopped_at: float | None = None
    client_heartbeat_at: float | None = None
    version: int = 1
    description: str = ""


class Deployment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    app_id: str = Field(index=True)
    version: int = 1
    created_at: float = 0.0
    functions: list[str] = Field(default_factory=list, sa_column=Column(JSON))


class Function(SQLModel, table=True):
    id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    name: str  # "f", "Cls", or "Cls(params-hash)" for a parameterized class instance
    parent_id: str | None = None  # class function a parameterized instance belongs to
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    module: str = ""
    source_name: str | None = None  # file name of the shipped source
    source_blob: str | None = None
    source_dir: str | None = None  # where the source lives on the client's host (used by the local provider)
    pickled_blob: str | None = None  # serialized=True functions and parameter values of class instances
    inline_env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    definition_hash: str = ""
    version: int = 1
    created_at: float = 0.0
    last_active_at: float = 0.0
    state: str = "active"  # active | stopped


class Call(SQLModel, table=True):
    id: str = Field(primary_key=True)
    function_id: str = Field(index=True)
    app_id: str = Field(index=True)
    kind: str = "remote"  # remote | map | spawn | spawn_map | schedule
    created_at: float = 0.0
    num_inputs: int = 0
    cancelled: bool = False


class Input(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("call_id", "idx"),
        # Partial indexes: only unfinished inputs are ever looked up by state, and finished ones pile up.
        Index(
            "ix_input_pending",
            "function_id",
            "id",
            sqlite_where=text("state = 0"),
            postgresql_where=text("state = 0"),
        ),
        Index(
            "ix_input_open",
            "function_id",
            "state",
            sqlite_where=text("state < 2"),
            postgresql_where=text("state < 2"),
        ),
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
    state: int = 0  # 0 pending, 1 claimed, 2 done
    attempts: int = 0  # retries consumed by user exceptions and timeouts
    crashes: int = 0  # worker deaths while running it (never counted against Retries)
    worker_id: str | None = None
    lease_expires: float = 0.0
    available_at: float = 0.0
    created_at: float = 0.0


class Output(SQLModel, table=True):
    __table_args__ = (
        UniqueConstraint("input_id", "gen_index"),
        Index("ix_output_call", "call_id", "id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    input_id: int
    call_id: str
    idx: int
    gen_index: int = -1  # -1: the input's final output; 0..n: generator items
    status: str = "success"  # success | failure | timeout | crashed | cancelled | gen_item
    data: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    data_blob: str | None = None
    created_at: float = 0.0


class Worker(SQLModel, table=True):
    id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    function_id: str = Field(index=True)
    provider: str = "local"
    instance_id: str = ""
    state: str = "starting"  # starting | ready | draining | stopped
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


class Event(SQLModel, table=True):
    __table_args__ = (Index("ix_event_app", "app_id", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    app_id: str | None = None
    function_id: str | None = None
    ts: float = 0.0
    kind: str = ""
    message: str = ""
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class Log(SQLModel, table=True):
    __table_args__ = (Index("ix_log_app", "app_id", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    app_id: str = ""
    function_id: str | None = None
    worker_id: str | None = None
    call_id: str | None = None
    stream: str = "stdout"
    ts: float = 0.0
    text: str = ""
