"""Tables of Volumes (their names and committed versions; the files live in an object store).

Imported by :mod:`cloudmodal.server.models` (so one ``metadata`` holds every table); created by their migration.
"""

# No ``from __future__ import annotations``: see models.py (Pydantic would compile each annotation's string).
from sqlmodel import Field

from cloudmodal.server.models import Row, _table


class Volume(Row, table=True):
    """A volume: where its files live, and its head (the committed version and the manifest that lists it).

    The control plane keeps only this row; clients and workers read and write the files in the object store
    themselves (:mod:`cloudmodal.volumes`). A commit moves the head from ``version`` to ``version + 1`` with a
    compare-and-swap on this row, so two commits never both win the same version."""

    __tablename__ = "volume"

    id: str = Field(primary_key=True)  # "vo-..."
    name: str | None = Field(default=None, index=True, unique=True)  # None: ephemeral
    ephemeral: bool = False
    created_at: float = 0.0
    created_by: str | None = None  # the token id (or "worker:<id>") that created it
    last_used_at: float | None = None  # the last commit
    store_url: str = ""  # the object store it lives in (a directory, s3://..., gs://..., az://...)
    prefix: str = ""  # its files' prefix in that store
    version: int = 0  # committed versions so far (0: empty, no manifest)
    manifest: str | None = None  # the store key of the head version's manifest


volumes = _table(Volume)
