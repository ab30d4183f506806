"""Volumes on the control plane: their names, where their files live, and their heads.

The control plane never touches a volume's files on the request path: clients and workers read and write the
object store themselves (:mod:`cloudmodal.volumes`) and come here for two things only — resolving a name to
the volume's id and store location, and publishing a commit. A commit is a compare-and-swap of the head, one
``UPDATE volume SET version = expected + 1, manifest = ... WHERE id = ... AND version = expected`` statement:
of two commits racing from the same version exactly one matches a row, on SQLite and PostgreSQL alike; the
other is told it lost and retries on top of the winner (the engine's rule).

Who may do what (checked here, with :func:`check_access`): volumes belong to the team, not to an app, so an
owner and a team-wide member manage them all (create, list, rename, delete); a worker, on behalf of its
function's code, looks volumes up (creating one with ``create_if_missing``), reads and commits them, and
deletes only volumes it created (its ephemeral ones); a member token scoped to apps has no access to volumes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import and_, delete, select, update
from sqlalchemy.exc import IntegrityError

from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.ids import new_id
from cloudmodal.secret import check_object_name
from cloudmodal.server.models_volumes import volumes as V
from cloudmodal.server.security import app_scoped_refusal

if TYPE_CHECKING:
    from cloudmodal.server.security import Identity
    from cloudmodal.server.service import ControlPlane

log = logging.getLogger("cloudmodal.server")

VOLUME_ID_RE = re.compile(r"^vo-[a-zA-Z0-9]{22}$")
LIST_MAX = 10_000

# What each operation needs: "read" (look up, read the head), "commit", "create", "manage" (list, rename,
# delete any volume).
Op = Literal["read", "commit", "create", "manage"]


def check_access(who: Identity, op: Op) -> None:
    """Raise :class:`PermissionDeniedError` unless ``who`` may do ``op`` on the team's volumes."""
    if who.team_wide:
        return
    refusal = app_scoped_refusal(who, "use volumes", "volumes")
    if refusal is not None:
        raise PermissionDeniedError(refusal)
    if who.kind == "worker" and op in ("read", "commit", "create"):
        return
    raise PermissionDeniedError(
        "A worker token may not list, rename or delete the team's volumes (it looks them up, creates, reads and "
        "commits them, and deletes only volumes it created): that needs an owner or team-wide member token."
    )


def volume_location(store_url: str, prefix: str) -> str:
    """The URL of a volume's own store: its prefix under the team's volume store."""
    return store_url.rstrip("/") + "/" + prefix if prefix else store_url


LOCAL_MARKER = ".cloudmodal-volume"  # in a local-directory volume's root: the volume's id


def is_local(location: str) -> bool:
    """Whether a volume's files are in a directory (of the control plane's machine), not a bucket."""
    return "://" not in location or location.startswith("file://")


def public_row(row: Any) -> dict[str, Any]:
    """A volume as routes answer it (every column is safe to show: names, dates, where the files are)."""
    d = dict(row._mapping)
    d["location"] = volume_location(d["store_url"], d["prefix"])
    return d


class Volumes:
    def __init__(self, cp: ControlPlane, store_url: str | None) -> None:
        """``store_url``: where new volumes keep their files (the ``volume_store`` setting; None: ``volumes/``
        in the state directory). Each volume records its own location, so changing the setting later leaves
        existing volumes where they are."""
        self.cp = cp
        self.store_url = store_url or str(Path(cp.settings.state_dir).resolve() / "volumes")

    # -- look-ups ----------------------------------------------------------------------------------------
    def _find(self, conn: Any, ref: str) -> Any:
        col = V.c.id if VOLUME_ID_RE.match(ref) else V.c.name
        return conn.execute(select(V).where(col == ref)).first()

    def get(self, who: Identity, ref: str) -> dict[str, Any]:
        """The volume named ``ref`` (or with id ``ref``)."""
        check_access(who, "read")
        with self.cp.db.read() as conn:
            row = self._find(conn, ref)
        if row is None:
            raise NotFoundError(
                f"Volume {ref!r} not found. `cloudmodal volume create {ref}` creates it, or use "
                f"Volume.from_name({ref!r}, create_if_missing=True)."
            )
        return public_row(row)

    def list(
        self, who: Identity, limit: int = 1000, created_before: float | None = None
    ) -> list[dict[str, Any]]:
        """Named volumes, newest first (ephemeral ones are not listed, as in Modal)."""
        check_access(who, "manage")
        q = select(V).where(V.c.ephemeral.is_(False))
        if created_before is not None:
            q = q.where(V.c.created_at < created_before)
        with self.cp.db.read() as conn:
            rows = conn.execute(q.order_by(V.c.created_at.desc()).limit(max(1, min(limit, LIST_MAX)))).all()
        return [public_row(r) for r in rows]

    # -- create ------------------------------------------------------------------------------------------
    def create(
        self,
        who: Identity,
        name: str | None,
        mode: Literal["create", "lookup"],
        allow_existing: bool = False,
        create_if_missing: bool = False,
    ) -> dict[str, Any]:
        """``mode="create"`` (``Volume.objects.create``): a new named volume, or the existing one with
        ``allow_existing``. ``mode="lookup"`` (``Volume.from_name``): the existing one, created with
        ``create_if_missing``. ``name=None``: a new ephemeral volume. The answer has ``created``."""
        if name is None:
            check_access(who, "create")
            return self._insert(who, None) | {"created": True}
        if VOLUME_ID_RE.match(name):
            if mode == "lookup":  # a function mounting an ephemeral volume names it by id
                return self.get(who, name) | {"created": False}
            raise InvalidError(
                f"Invalid Volume name {name!r}: it looks like a volume id (vo-...); choose another."
            )
        check_object_name(name, "Volume")
        creating = mode == "create" or create_if_missing
        check_access(who, "create" if creating else "read")
        with self.cp.db.read() as conn:
            row = self._find(conn, name)
        if row is not None:
            if mode == "create" and not allow_existing:
                raise AlreadyExistsError(f"Volume {name!r} already exists.")
            return public_row(row) | {"created": False}
        if not creating:
            return self.get(who, name)  # raises NotFoundError with the fix
        try:
            return self._insert(who, name) | {"created": True}
        except AlreadyExistsError:
            if mode == "create" and not allow_existing:
                raise
            return self.get(who, name) | {"created": False}  # another request created it meanwhile

    def _insert(self, who: Identity, name: str | None) -> dict[str, Any]:
        vid = new_id("vo")
        values = dict(
            id=vid,
            name=name,
            ephemeral=name is None,
            created_at=time.time(),
            created_by=who.principal,
            last_used_at=None,
            store_url=self.store_url,
            prefix=vid,
            version=0,
            manifest=None,
        )
        location = volume_location(self.store_url, vid)
        if is_local(location):
            # The marker tells a client or worker that opens this path that it is the control plane's own
            # directory, not an empty one on another machine (where its writes would be lost).
            Path(location).mkdir(parents=True, exist_ok=True)
            (Path(location) / LOCAL_MARKER).write_text(vid + "\n")
        try:
            with self.cp.db.write() as conn:
                conn.execute(V.insert().values(**values))
        except IntegrityError:
            raise AlreadyExistsError(f"Volume {name!r} already exists.") from None
        log.info("volume %s created (%s)", vid, name or "ephemeral")
        with self.cp.db.read() as conn:
            return public_row(conn.execute(select(V).where(V.c.id == vid)).one())

    # -- rename, delete ----------------------------------------------------------------------------------
    def rename(self, who: Identity, ref: str, new_name: str) -> dict[str, Any]:
        check_access(who, "manage")
        check_object_name(new_name, "Volume")
        if VOLUME_ID_RE.match(new_name):
            raise InvalidError(f"Invalid Volume name {new_name!r}: it looks like a volume id (vo-...).")
        row = self.get(who, ref)
        if row["ephemeral"]:
            raise InvalidError("An ephemeral volume has no name to change.")
        try:
            with self.cp.db.write() as conn:
                conn.execute(update(V).where(V.c.id == row["id"]).values(name=new_name))
        except IntegrityError:
            raise AlreadyExistsError(f"Cannot rename {ref!r}: volume {new_name!r} already exists.") from None
        return self.get(who, row["id"])

    def delete(self, who: Identity, ref: str, allow_missing: bool = False) -> dict[str, Any]:
        """Delete the volume: its name is free at once; its files are removed from the store after (a
        failure there is logged, and leaves only unreachable objects under the volume's own prefix)."""
        if who.kind == "worker":
            check_access(who, "create")
        else:
            check_access(who, "manage")
        with self.cp.db.read() as conn:
            row = self._find(conn, ref)
        if row is None:
            if allow_missing:
                return {"deleted": None}
            raise NotFoundError(f"Volume {ref!r} not found.")
        if who.kind == "worker" and row.created_by != who.principal:
            raise PermissionDeniedError(
                f"A worker may not delete volume {ref!r}: it deletes only volumes it created. Delete it with an "
                "owner token."
            )
        with self.cp.db.write() as conn:
            conn.execute(delete(V).where(V.c.id == row.id))
        location = volume_location(row.store_url, row.prefix)
        threading.Thread(
            target=self._remove_files, args=(location,), name="volume-delete", daemon=True
        ).start()
        return {"deleted": row.id}

    @staticmethod
    def _remove_files(location: str) -> None:
        try:
            from cloudmodal.volumes.store import open_store

            store = open_store(location)
            for key in list(store.list("")):
                store.delete(key)
            if is_local(location):  # a directory: remove the emptied tree (and its marker) too
                import shutil

                shutil.rmtree(location, ignore_errors=True)
        except Exception as e:
            log.warning("could not remove a deleted volume's files at %s: %s", location, e)

    def heartbeat(self, who: Identity, volume_id: str) -> dict[str, Any]:
        """An ephemeral volume's client is alive (``Volume.ephemeral()`` beats every minute): :func:`prune`
        keeps it."""
        check_access(who, "read")
        with self.cp.db.write() as conn:
            n = conn.execute(
                update(V)
                .where(and_(V.c.id == volume_id, V.c.ephemeral.is_(True)))
                .values(last_used_at=time.time())
            ).rowcount
        if not n:
            raise NotFoundError(f"Ephemeral volume {volume_id} not found (deleted, or idle too long).")
        return {}

    # -- the head ----------------------------------------------------------------------------------------
    def head(self, who: Identity, volume_id: str) -> dict[str, Any]:
        check_access(who, "read")
        with self.cp.db.read() as conn:
            row = conn.execute(select(V.c.version, V.c.manifest).where(V.c.id == volume_id)).first()
        if row is None:
            raise NotFoundError(f"Volume {volume_id} not found (deleted?).")
        return {"version": row.version, "manifest": row.manifest}

    def swap(self, who: Identity, volume_id: str, expected: int, manifest: str) -> dict[str, Any]:
        """Publish ``manifest`` as version ``expected + 1`` if the head is still at ``expected``. The answer's
        ``swapped`` says whether this commit won; the head as it is now comes with it either way."""
        check_access(who, "commit")
        with self.cp.db.write() as conn:
            won = conn.execute(
                update(V)
                .where(and_(V.c.id == volume_id, V.c.version == expected))
                .values(version=expected + 1, manifest=manifest, last_used_at=time.time())
            ).rowcount
            row = conn.execute(select(V.c.version, V.c.manifest).where(V.c.id == volume_id)).first()
        if row is None:
            raise NotFoundError(f"Volume {volume_id} not found (deleted?).")
        return {"swapped": bool(won), "version": row.version, "manifest": row.manifest}


EPHEMERAL_IDLE_S = 600.0  # an ephemeral volume with no heartbeat or commit for this long is deleted


def prune(cp: ControlPlane, now: float, idle_s: float = EPHEMERAL_IDLE_S) -> int:
    """Delete the ephemeral volumes whose client stopped beating (it crashed, or lost the control plane) for
    ``idle_s``, and their files; the number deleted. Called by the retention pass."""
    cutoff = now - idle_s
    with cp.db.read() as conn:
        rows = conn.execute(
            select(V.c.id, V.c.store_url, V.c.prefix, V.c.created_at, V.c.last_used_at).where(
                V.c.ephemeral.is_(True)
            )
        ).all()
    idle = [r for r in rows if (r.last_used_at or r.created_at) < cutoff]
    for r in idle:
        with cp.db.write() as conn:
            conn.execute(delete(V).where(V.c.id == r.id))
        Volumes._remove_files(volume_location(r.store_url, r.prefix))
        log.info("ephemeral volume %s deleted: no heartbeat for %.0f s", r.id, idle_s)
    return len(idle)


# Old versions (gc_versions): what is kept of each volume, and how often it is looked at.
GC_KEEP_VERSIONS = 10  # the newest versions kept whatever their age (the head among them)
GC_KEEP_S = 3600.0  # and every version that was the head less than this long ago (readers may be on it)
GC_GRACE_S = 24 * 3600.0  # an unreferenced object younger than this may be a commit in flight: kept
GC_EVERY_S = 3600.0  # a volume with no commit since its last collection is collected again after this


@dataclasses.dataclass
class VersionsGc:
    """What one :func:`gc_versions` pass did."""

    volumes: int = 0  # volumes collected
    manifests: int = 0  # old versions' manifests deleted
    blobs: int = 0  # parts deleted (no kept version uses them)
    failed: int = 0  # volumes whose collection failed (logged; retried next pass)


# Per control plane: volume id → (its version, when) at its last collection. In memory only: after a restart
# every volume is collected once more, which is harmless.
_last_gc: weakref.WeakKeyDictionary[ControlPlane, dict[str, tuple[int, float]]] = weakref.WeakKeyDictionary()


class _RowHead:
    """A volume's head as its row said when the pass read it. gc only reads it: a commit published meanwhile
    has a newer manifest and parts younger than the grace period, which gc leaves alone."""

    def __init__(self, version: int, manifest: str | None) -> None:
        self._head = (version, manifest)

    def read(self) -> tuple[int, str | None]:
        return self._head

    def swap(self, expected: int, manifest_key: str) -> bool:
        raise RuntimeError("garbage collection never commits")


def gc_versions(
    cp: ControlPlane,
    now: float,
    *,
    keep_versions: int = GC_KEEP_VERSIONS,
    keep_s: float = GC_KEEP_S,
    grace_s: float = GC_GRACE_S,
    every_s: float = GC_EVERY_S,
) -> VersionsGc:
    """Delete old versions of every volume, and the parts no kept version uses (the engine's
    :meth:`~cloudmodal.volumes.engine.VolumeData.gc`). Kept of each volume: the head, its ``keep_versions``
    newest versions, and every version that was the head less than ``keep_s`` ago — so a reader that resolved
    the head within the last ``keep_s`` (a client streaming a file, a container mounting or reloading) finds
    every part of its version; only objects older than ``grace_s`` are deleted (a commit in flight).

    A volume is collected when it has a commit since its last collection by this control plane, or that was
    longer than ``every_s`` ago (versions age out of ``keep_s`` without commits too). Called by the retention
    pass; a failure on one volume is logged and the others go on."""
    from cloudmodal.volumes.engine import VolumeData
    from cloudmodal.volumes.store import open_store

    with cp.db.read() as conn:
        rows = conn.execute(select(V.c.id, V.c.store_url, V.c.prefix, V.c.version, V.c.manifest)).all()
    last = _last_gc.setdefault(cp, {})
    for gone in set(last) - {r.id for r in rows}:
        del last[gone]
    report = VersionsGc()
    for r in rows:
        done = last.get(r.id)
        if r.version == 0 or (done is not None and done[0] == r.version and now - done[1] < every_s):
            continue
        location = volume_location(r.store_url, r.prefix)
        try:
            with VolumeData(open_store(location), _RowHead(r.version, r.manifest), clock=lambda: now) as data:
                manifests, blobs = data.gc(keep_versions, keep_s=keep_s, grace_s=grace_s)
        except Exception as e:
            report.failed += 1
            log.warning("volume %s: collecting old versions at %s failed: %s", r.id, location, e)
            continue
        last[r.id] = (r.version, now)
        report.volumes += 1
        report.manifests += manifests
        report.blobs += blobs
        if manifests or blobs:
            log.info("volume %s: %d old manifests and %d unused parts deleted", r.id, manifests, blobs)
    return report
