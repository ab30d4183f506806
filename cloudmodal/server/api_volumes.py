"""HTTP routes of Volumes (their names and committed versions; the files live in an object store): added to the
control plane's route table by :func:`cloudmodal.server.api.build_routes`.

``{ref}`` is a volume's name or its id (``vo-...``; names that look like ids are refused). Every route is
``"caller"`` level; :func:`cloudmodal.server.svc_volumes.check_access` narrows it per operation.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StringConstraints

from cloudmodal.server.limits import SMALL_BODY, Timestamp
from cloudmodal.server.security import Identity
from cloudmodal.server.svc_volumes import Volumes

VolumeName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9\-_.]{1,64}$")]
Version = Annotated[int, Field(ge=0, le=2**31 - 2)]  # the column is a 32-bit integer; expected + 1 fits
# A manifest's key in the volume's store: one object under manifests/ (the engine names them
# "manifests/<version>-<hash>.json"), never a path that leaves it.
ManifestKey = Annotated[str, StringConstraints(pattern=r"^manifests/[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")]


class VolumeCreate(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    name: VolumeName | None = None  # None: an ephemeral volume
    mode: Literal["create", "lookup"] = "create"
    allow_existing: bool = False  # mode "create"
    create_if_missing: bool = False  # mode "lookup"


class VolumeRename(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    name: VolumeName


class VolumeDelete(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    allow_missing: bool = False


class VolumeCommit(BaseModel):
    max_body: ClassVar[int] = SMALL_BODY

    expected: Version
    manifest: ManifestKey


def add_routes(route: Any, run: Any, cp: Any) -> None:
    """Add this module's routes with ``route(method, path, access, **kw)`` (the decorator ``build_routes``
    uses); ``run(fn, *args)`` runs blocking work (the database) off the event loop."""
    from cloudmodal.settings import settings

    vols = Volumes(cp, settings().volume_store)

    @route("POST", "/v1/volumes", "caller", body=VolumeCreate)
    async def create_volume(b: VolumeCreate, who: Identity) -> Any:
        """Create a volume, or look one up by name (``mode="lookup"``, optionally creating it); without a
        name, a new ephemeral volume. Answers the volume (with ``location``: where its files are) and
        ``created``."""
        return await run(vols.create, who, b.name, b.mode, b.allow_existing, b.create_if_missing)

    @route("GET", "/v1/volumes", "caller")
    async def list_volumes(
        who: Identity,
        limit: Annotated[int, Field(ge=1, le=10_000)] = 1000,
        created_before: Timestamp | None = None,
    ) -> Any:
        """Named volumes, newest first."""
        return await run(vols.list, who, limit, created_before)

    @route("GET", "/v1/volumes/{ref}", "caller")
    async def get_volume(ref: str, who: Identity) -> Any:
        return await run(vols.get, who, ref)

    @route("POST", "/v1/volumes/{ref}/rename", "caller", body=VolumeRename)
    async def rename_volume(ref: str, b: VolumeRename, who: Identity) -> Any:
        return await run(vols.rename, who, ref, b.name)

    @route("POST", "/v1/volumes/{ref}/delete", "caller", body=VolumeDelete)
    async def delete_volume(ref: str, b: VolumeDelete, who: Identity) -> Any:
        """Delete a volume and its files (``{"deleted": id}``; ``null`` when missing with ``allow_missing``)."""
        return await run(vols.delete, who, ref, b.allow_missing)

    @route("POST", "/v1/volumes/{volume_id}/heartbeat", "caller")
    async def volume_heartbeat(volume_id: str, who: Identity) -> Any:
        """An ephemeral volume's client is alive (deleted after 10 minutes without one)."""
        return await run(vols.heartbeat, who, volume_id)

    @route("GET", "/v1/volumes/{volume_id}/head", "caller")
    async def volume_head(volume_id: str, who: Identity) -> Any:
        """The committed head: ``{"version", "manifest"}`` (version 0 and no manifest: never committed)."""
        return await run(vols.head, who, volume_id)

    @route("POST", "/v1/volumes/{volume_id}/commit", "caller", body=VolumeCommit)
    async def commit_volume(volume_id: str, b: VolumeCommit, who: Identity) -> Any:
        """Compare-and-swap the head: ``manifest`` becomes version ``expected + 1`` if the head is still at
        ``expected``. ``{"swapped": false, ...}`` answers a commit that lost the race (the head it lost to
        comes with it): the committer rebuilds on top of that head and tries again."""
        return await run(vols.swap, who, volume_id, b.expected, b.manifest)
