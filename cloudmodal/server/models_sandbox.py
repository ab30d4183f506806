"""The table of sandboxes (``cloudmodal.Sandbox``).

Imported by :mod:`cloudmodal.server.models` (so one ``metadata`` holds every table); created by migration 0011.
One row per sandbox: what it runs, its tags, and how it ended. Its live state (the host process, the streams)
is in the memory of the control plane that started it (:mod:`cloudmodal.server.svc_sandbox`).
"""

# No ``from __future__ import annotations``: see models.py (SQLModel evaluates the annotations).
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field

from cloudmodal.server.models import Row


class SandboxRow(Row, table=True):
    """A sandbox: its command, tags and end."""

    __tablename__ = "sandbox"

    id: str = Field(primary_key=True)
    app_id: str = Field(index=True)
    created_by: str = ""  # the principal of the token that created it
    state: str = "running"  # running | finished | terminated | timeout
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # command, limits (no secret values)
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    returncode: int | None = None
    created_at: float = 0.0
    finished_at: float | None = None
