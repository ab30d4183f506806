"""``cloudmodal.Volume``: a named, persistent file system mounted into functions (``volumes={path: vol}``).

A volume's files live in an object store (a directory by default; S3, GCS or Azure Blob for a team that sets
``CLOUDMODAL_VOLUME_STORE``), versioned by :mod:`cloudmodal.volumes` (the storage engine); the control plane
keeps its name and its head (the committed version). This module is the handle users hold:

- outside a function (or inside one, on a volume it does not mount), every method reads the latest committed
  version and every write (``batch_upload``, ``remove_file``, ``copy_files``) is one commit;
- inside a function that mounts the volume, its files are a directory at the mount path; ``commit()``
  publishes what the function changed there, ``reload()`` brings in what others committed since (see
  :mod:`cloudmodal.worker.volumes`). The container also commits when it exits.
- ``vol.with_mount_options(read_only=True, sub_path="dir")`` mounts it read-only and/or only one directory.

Two commits at once both land; where they touched the same path, the one published later wins (per path, a
file never mixes two writers): Modal's "last write wins", with nothing else lost.

Blocking methods have ``.aio`` twins (``await vol.listdir.aio("/")``), as in Modal. Heavy modules (HTTP, the
engine) are imported when a method first needs them, so ``import cloudmodal`` stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import posixpath
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

from cloudmodal._environment import check_environment
from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError
from cloudmodal.secret import check_object_name

if TYPE_CHECKING:
    from cloudmodal.client.transport import Transport
    from cloudmodal.volumes.engine import Batch, FileEntry, VolumeData

EPHEMERAL_HEARTBEAT_S = 60.0  # how often Volume.ephemeral() tells the control plane its client is alive
_VOLUME_ID_RE = re.compile(r"^vo-[a-zA-Z0-9]{22}$")
T = TypeVar("T")


# -- .aio twins ---------------------------------------------------------------------------------------------
class _Dual(Generic[T]):
    """A bound blocking method with an ``.aio`` twin that runs it in a thread."""

    def __init__(self, fn: Callable[..., T]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        return self._fn(*args, **kwargs)

    async def aio(self, *args: Any, **kwargs: Any) -> T:
        import asyncio

        return await asyncio.to_thread(self._fn, *args, **kwargs)


class _DualIter(_Dual[Iterator[T]]):
    """A blocking method returning an iterator; ``.aio`` returns an async iterator over the same items."""

    async def aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[T]:  # type: ignore[override]
        import asyncio

        it = await asyncio.to_thread(self._fn, *args, **kwargs)
        done = object()
        while (item := await asyncio.to_thread(next, it, done)) is not done:
            yield item  # type: ignore[misc]


class _twin:
    """Descriptor: ``vol.method`` is a :class:`_Dual` bound to ``vol``."""

    def __init__(self, fn: Callable[..., Any], kind: type[_Dual[Any]] = _Dual) -> None:
        self._fn = fn
        self._kind = kind
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return self._kind(self._fn.__get__(obj, owner))


def _twin_iter(fn: Callable[..., Any]) -> _twin:
    return _twin(fn, _DualIter)


# -- the control plane's side of a volume -------------------------------------------------------------------
class ControlPlaneHead:
    """The engine's :class:`~cloudmodal.volumes.engine.Head` for a volume of this control plane: ``read``
    and a compare-and-swap ``swap`` through its HTTP API (the swap is one conditional ``UPDATE`` there)."""

    def __init__(self, transport: Transport, volume_id: str) -> None:
        self._t = transport
        self._id = volume_id

    def read(self) -> tuple[int, str | None]:
        h = self._t.get(f"/v1/volumes/{self._id}/head")
        return int(h["version"]), h["manifest"]

    def swap(self, expected: int, manifest_key: str) -> bool:
        r = self._t.post(f"/v1/volumes/{self._id}/commit", {"expected": expected, "manifest": manifest_key})
        return bool(r["swapped"])


def check_sub_path(sub_path: object) -> str | None:
    """``with_mount_options(sub_path=...)``, checked: a relative path inside the volume, normalized (no
    ``.``, ``..``, empty or trailing components), e.g. ``"models/v2"``. ``""``, ``"."`` and ``"/"`` would mean
    the whole volume and are refused (leave ``sub_path`` out for that)."""
    if not isinstance(sub_path, str):
        raise InvalidError(f"sub_path must be a string such as 'models/v2', not {type(sub_path).__name__}.")
    fix = "Write a relative path inside the volume, e.g. sub_path='models/v2'."
    if sub_path.startswith("/"):
        raise InvalidError(f"sub_path {sub_path!r} is absolute: it is a path inside the volume. {fix}")
    parts = sub_path.split("/")
    if "\x00" in sub_path or "\\" in sub_path:
        raise InvalidError(f"sub_path {sub_path!r} holds a NUL byte or a backslash. {fix}")
    if ".." in parts:
        raise InvalidError(f"sub_path {sub_path!r} climbs out of the volume with '..'. {fix}")
    if sub_path in ("", "."):
        raise InvalidError(f"sub_path {sub_path!r} names the whole volume: leave sub_path out instead.")
    normal = posixpath.normpath(sub_path)
    if normal != sub_path or any(p in ("", ".") for p in parts):
        raise InvalidError(f"sub_path {sub_path!r} is not normalized: write it as {normal!r}.")
    if len(sub_path) > 1024:
        raise InvalidError(f"sub_path is {len(sub_path)} characters long; at most 1024.")
    return sub_path


def _transport() -> Transport:
    from cloudmodal.client.session import current_session

    return current_session().transport


def _cache_dir(location: str) -> str | None:
    """Where a worker keeps parts it read from a remote store (shared by its volumes: parts are
    content-addressed); None for a local directory store (the parts are on this disk already)."""
    if "://" not in location or location.startswith("file://"):
        return None
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"cloudmodal-volume-cache-{os.getuid()}")


def open_volume_data(transport: Transport, row: dict[str, Any]) -> VolumeData:
    """The engine's view of the volume ``row`` (as the control plane answers it): its store, opened from
    here, with the control plane as its head.

    A volume in the control plane's own directory (the default store) is reachable only on that machine: from
    anywhere else the path is missing its marker, and this refuses rather than write where nobody else looks."""
    from pathlib import Path

    from cloudmodal.volumes.engine import VolumeData
    from cloudmodal.volumes.store import open_store

    location = row["location"]
    if ("://" not in location or location.startswith("file://")) and not os.path.isfile(
        os.path.join(location.removeprefix("file://"), ".cloudmodal-volume")
    ):
        raise InvalidError(
            f"Volume {row['name'] or row['id']!r} keeps its files in {location!r}, a directory on the control "
            "plane's machine, which this machine cannot see. Set CLOUDMODAL_VOLUME_STORE on the control plane to "
            "a bucket every worker and client can reach (s3://..., gs://..., az://...) for volumes created after."
        )
    cache = _cache_dir(location)
    return VolumeData(
        open_store(location), ControlPlaneHead(transport, row["id"]), Path(cache) if cache else None
    )


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """What :meth:`Volume.info` answers."""

    name: str | None
    id: str
    created_at: float
    created_by: str | None
    version: int  # committed versions so far
    location: str  # where its files are


class _Resolved:
    """A handle's look-up, made once: the volume's row and its opened data (per process, never pickled)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transport: Transport | None = None  # the session the look-up was made in
        self.row: dict[str, Any] | None = None
        self.data: VolumeData | None = None


class _BatchUpload:
    """``with vol.batch_upload() as batch:`` — ``put_file`` / ``put_directory`` upload as they are called;
    leaving the block without an error publishes them as one commit (an error publishes nothing)."""

    def __init__(self, batch: Batch) -> None:
        self._batch = batch

    def put_file(
        self, local_file: str | os.PathLike[str] | BinaryIO, remote_path: str, mode: int | None = None
    ) -> None:
        """Upload a local file (a path or a binary file object such as ``io.BytesIO``) to ``remote_path``."""
        self._batch.put_file(local_file, remote_path, mode)

    def put_directory(
        self, local_path: str | os.PathLike[str], remote_path: str, recursive: bool = True
    ) -> None:
        """Upload a local directory's files under ``remote_path``."""
        self._batch.put_directory(local_path, remote_path, recursive)

    def __enter__(self) -> _BatchUpload:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self._batch.commit()

    async def __aenter__(self) -> _BatchUpload:
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            import asyncio

            await asyncio.to_thread(self._batch.commit)


class _Objects:
    """``Volume.objects``: create, list and delete volumes by name."""

    @staticmethod
    def _create(name: str, *, allow_existing: bool = False, **_: Any) -> None:
        """Create the volume ``name`` (``AlreadyExistsError`` if it exists, unless ``allow_existing``)."""
        check_object_name(name, "Volume")
        _transport().post("/v1/volumes", {"name": name, "mode": "create", "allow_existing": allow_existing})

    @staticmethod
    def _list(
        *, max_objects: int | None = None, created_before: float | None = None, **_: Any
    ) -> list[Volume]:
        """The team's named volumes, newest first."""
        params: dict[str, Any] = {"limit": max_objects or 10_000}
        if created_before is not None:
            params["created_before"] = (
                created_before.timestamp() if hasattr(created_before, "timestamp") else created_before
            )
        return [Volume._from_row(r) for r in _transport().get("/v1/volumes", **params)]

    @staticmethod
    def _delete(name: str, *, allow_missing: bool = False, **_: Any) -> None:
        """Delete the volume ``name`` and its files (``NotFoundError`` if missing, unless ``allow_missing``)."""
        _transport().post(f"/v1/volumes/{name}/delete", {"allow_missing": allow_missing})

    create = _Dual(_create)
    list = _Dual(_list)
    delete = _Dual(_delete)


class Volume(Frozen):
    """A volume: a file system that persists across function calls, shared by every function that mounts it.

    ```python
    vol = cloudmodal.Volume.from_name("weights", create_if_missing=True)

    @app.function(volumes={"/weights": vol})
    def train():
        Path("/weights/model.bin").write_bytes(...)
        vol.commit()  # also done when the container exits

    @app.function(volumes={"/weights": vol})
    def serve():
        vol.reload()  # see what train() committed since this container started
        return Path("/weights/model.bin").read_bytes()
    ```
    """

    __slots__ = (
        "name",
        "environment_name",
        "create_if_missing",
        "version",
        "_id",
        "_read_only",
        "_sub_path",
        "_resolved",
    )
    _immutable_message = "Volume handles are immutable"

    name: str | None
    environment_name: str | None
    create_if_missing: bool
    version: int | None
    _id: str | None
    _read_only: bool  # with_mount_options(read_only=True): mounted read-only
    _sub_path: str | None  # with_mount_options(sub_path=...): only this directory is mounted (normalized)
    _resolved: _Resolved

    objects = _Objects()

    def __init__(
        self,
        name: str | None,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
        volume_id: str | None = None,
    ) -> None:
        check_environment(environment_name, "Volume.from_name")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "environment_name", environment_name)
        object.__setattr__(self, "create_if_missing", create_if_missing)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "_id", volume_id)
        object.__setattr__(self, "_read_only", False)
        object.__setattr__(self, "_sub_path", None)
        object.__setattr__(self, "_resolved", _Resolved())

    # pickling (a handle travels to workers inside functions): the look-up is redone there, per process
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_resolved")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_read_only", False)  # pickled by a client from before mount options
        state.setdefault("_sub_path", None)
        super().__setstate__(state)
        object.__setattr__(self, "_resolved", _Resolved())

    # -- mount options -----------------------------------------------------------------------------------
    def with_mount_options(self, *, read_only: bool | None = None, sub_path: str | None = None) -> Volume:
        """A view of this volume to mount with options (as Modal's ``Volume.with_mount_options``):

        - ``read_only=True``: the function sees the files but cannot change them (writes fail with
          ``OSError`` EROFS, or ``PermissionError``); ``commit()`` raises, and nothing is committed in the
          background or when the container exits. ``reload()`` still brings in others' commits.
        - ``sub_path="models/v2"``: only that directory of the volume is mounted, at the mount path (a
          relative path inside the volume, without ``..``; a directory that does not exist yet mounts empty
          and is created by the first commit of a file under it).

        Options left ``None`` keep this handle's. Reads and writes through the handle itself
        (``listdir``, ``batch_upload`` …) are not affected: they always see the whole volume.

        ```python
        weights = cloudmodal.Volume.from_name("weights")

        @app.function(volumes={"/weights": weights.with_mount_options(read_only=True, sub_path="v2")})
        def serve(): ...
        ```
        """
        view = Volume(
            self.name,
            environment_name=self.environment_name,
            create_if_missing=self.create_if_missing,
            version=self.version,
            volume_id=self._id,
        )
        if read_only is not None:
            if not isinstance(read_only, bool):
                raise InvalidError(f"read_only must be True or False, not {read_only!r}.")
            object.__setattr__(view, "_read_only", read_only)
        else:
            object.__setattr__(view, "_read_only", self._read_only)
        object.__setattr__(
            view, "_sub_path", check_sub_path(sub_path) if sub_path is not None else self._sub_path
        )
        object.__setattr__(view, "_resolved", self._resolved)  # the same volume: share its look-up
        return view

    @property
    def read_only(self) -> bool:
        """Whether this handle mounts the volume read-only (:meth:`with_mount_options`)."""
        return self._read_only

    @property
    def sub_path(self) -> str | None:
        """The directory of the volume this handle mounts (:meth:`with_mount_options`); None: all of it."""
        return self._sub_path

    # -- constructors ------------------------------------------------------------------------------------
    @staticmethod
    def from_name(
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
        **_: Any,
    ) -> Volume:
        """A lazy handle to the volume ``name``; with ``create_if_missing=True`` it is created on first use."""
        check_object_name(name, "Volume")
        if _VOLUME_ID_RE.match(name):
            raise InvalidError(
                f"Invalid Volume name {name!r}: it looks like a volume id; use Volume.from_id."
            )
        if not isinstance(create_if_missing, bool):
            raise InvalidError(f"create_if_missing must be True or False, not {create_if_missing!r}.")
        if version not in (None, 1, 2):
            raise InvalidError(f"Volume version must be 1, 2 or None (the default), not {version!r}.")
        return Volume(
            name, environment_name=environment_name, create_if_missing=create_if_missing, version=version
        )

    @staticmethod
    def from_id(volume_id: str) -> Volume:
        """A handle to the volume with this id (``vo-...``)."""
        if not isinstance(volume_id, str) or not _VOLUME_ID_RE.match(volume_id):
            raise InvalidError(f"{volume_id!r} is not a volume id (vo- and 22 letters or digits).")
        row = _transport().get(f"/v1/volumes/{volume_id}")
        return Volume._from_row(row)

    @staticmethod
    def _from_row(row: dict[str, Any]) -> Volume:
        v = Volume(row["name"], volume_id=row["id"])
        v._resolved.row = row
        return v

    @staticmethod
    @contextlib.contextmanager
    def ephemeral(**_: Any) -> Iterator[Volume]:
        """A volume that exists for the ``with`` block and is deleted, with its files, when it ends.

        ```python
        with cloudmodal.Volume.ephemeral() as vol:
            with vol.batch_upload() as batch:
                batch.put_file("data.csv", "/data.csv")
        ```
        """
        t = _transport()
        row = t.post("/v1/volumes", {"name": None})
        vol = Volume._from_row(row)
        stop = threading.Event()

        def beat() -> (
            None
        ):  # without it, the control plane deletes the volume 10 minutes after its client died
            while not stop.wait(EPHEMERAL_HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a missed beat is retried at the next
                    t.post(f"/v1/volumes/{row['id']}/heartbeat", reconnect_timeout=30.0)

        threading.Thread(target=beat, name="volume-heartbeat", daemon=True).start()
        try:
            yield vol
        finally:
            stop.set()
            vol._close()
            t.post(f"/v1/volumes/{row['id']}/delete", {"allow_missing": True})

    @staticmethod
    def _rename(old_name: str, new_name: str, **_: Any) -> None:
        """Rename the volume ``old_name`` to ``new_name``."""
        check_object_name(new_name, "Volume")
        _transport().post(f"/v1/volumes/{old_name}/rename", {"name": new_name})

    rename = _Dual(_rename)

    # -- resolution --------------------------------------------------------------------------------------
    def _row(self) -> dict[str, Any]:
        r = self._resolved
        t = _transport()
        with r.lock:
            if r.transport is not t:
                # another session (another control plane, or a reconnect): look the volume up again there
                if r.data is not None:
                    r.data.close()
                r.transport, r.row, r.data = t, (r.row if r.transport is None else None), None
            if r.row is None:
                if self._id is not None:
                    r.row = t.get(f"/v1/volumes/{self._id}")
                else:
                    r.row = t.post(
                        "/v1/volumes",
                        {"name": self.name, "mode": "lookup", "create_if_missing": self.create_if_missing},
                    )
            return r.row

    def hydrate(self) -> Volume:
        """Look the volume up now (creating it with ``create_if_missing``) instead of on first use."""
        self._row()
        return self

    @property
    def object_id(self) -> str:
        """The volume's id (``vo-...``); looks the name up (creating it with ``create_if_missing``)."""
        return self._id or str(self._row()["id"])

    def _data(self) -> VolumeData:
        row = self._row()
        r = self._resolved
        with r.lock:
            if r.data is None:
                assert r.transport is not None
                r.data = open_volume_data(r.transport, row)
            return r.data

    def _close(self) -> None:
        r = self._resolved
        with r.lock:
            if r.data is not None:
                r.data.close()
                r.data = None

    def _mounts(self) -> list[Any]:
        """This container's mounts of this volume (none outside a worker)."""
        import sys

        mod = sys.modules.get("cloudmodal.worker.volumes")
        if mod is None:
            return []
        return list(mod.mounts_of(self.name, self._id))

    # -- in a container ----------------------------------------------------------------------------------
    def _commit(self) -> None:
        """Publish the changes this container made under the volume's mount path (one atomic version).
        Nothing to do where the volume is not mounted: writes through this handle commit as they are made.
        Raises ``InvalidError`` where it is mounted read-only (``with_mount_options(read_only=True)``)."""
        for m in self._mounts():
            m.commit()

    def _reload(self) -> None:
        """Bring the mount up to the latest committed version (keeping this container's uncommitted changes).
        Fails while files under the mount are open (close them first). Nothing to do where it is not mounted:
        reads through this handle always see the latest version."""
        for m in self._mounts():
            m.reload()

    commit = _twin(_commit)
    reload = _twin(_reload)

    # -- reading -----------------------------------------------------------------------------------------
    def _read_file(self, path: str) -> Iterator[bytes]:
        """The file's content, in chunks. ``FileNotFoundError`` if it is not in the volume."""
        return self._data().read_file(path)

    def _read_file_into_fileobj(self, path: str, fileobj: BinaryIO) -> int:
        """Write the file's content into ``fileobj``; the number of bytes written."""
        n = 0
        for chunk in self._data().read_file(path):
            fileobj.write(chunk)
            n += len(chunk)
        return n

    def _listdir(self, path: str = "/", *, recursive: bool = False) -> list[FileEntry]:
        """The entries under ``path`` (a ``FileEntry`` each: ``path``, ``type``, ``mtime``, ``size``)."""
        return self._data().listdir(path, recursive)

    def _iterdir(self, path: str = "/", *, recursive: bool = True) -> Iterator[FileEntry]:
        """The entries under ``path``, recursively by default."""
        yield from self._data().listdir(path, recursive)

    read_file = _twin_iter(_read_file)
    read_file_into_fileobj = _twin(_read_file_into_fileobj)
    listdir = _twin(_listdir)
    iterdir = _twin_iter(_iterdir)

    # -- writing -----------------------------------------------------------------------------------------
    def _batch_upload(self, force: bool = False) -> _BatchUpload:
        """Upload files, published as one commit when the ``with`` block ends. Without ``force``, uploading
        onto an existing file raises ``FileExistsError``."""
        return _BatchUpload(self._data().batch(force=force))

    def _remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory with ``recursive=True`` (one commit)."""
        with self._data().batch() as b:
            b.remove(path, recursive)

    def _copy_files(self, src_paths: list[str], dst_path: str, recursive: bool = False) -> None:
        """Copy files within the volume with ``cp``'s rules (one commit): several sources go into the
        directory ``dst_path``; directories need ``recursive=True``."""
        with self._data().batch() as b:
            b.copy(src_paths, dst_path, recursive)

    batch_upload = _twin(_batch_upload)
    remove_file = _twin(_remove_file)
    copy_files = _twin(_copy_files)

    # -- about it ----------------------------------------------------------------------------------------
    def _info(self) -> VolumeInfo:
        """Its name, id, creation, committed version and where its files are."""
        row = _transport().get(f"/v1/volumes/{self.object_id}")
        return VolumeInfo(
            row["name"], row["id"], row["created_at"], row["created_by"], row["version"], row["location"]
        )

    info = _twin(_info)

    def _mount_ref(self) -> str:
        """How a function's spec names this volume: its name, or its id for an ephemeral one."""
        if self.name is not None:
            return self.name
        assert self._id is not None
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Volume):
            return False
        if self.name is not None or other.name is not None:
            return (self.name, self.environment_name) == (other.name, other.environment_name)
        return self._id == other._id

    def __hash__(self) -> int:
        return hash((self.name, self.environment_name) if self.name is not None else self._id)

    def __repr__(self) -> str:
        base = (
            f"Volume.from_name({self.name!r})" if self.name is not None else f"Volume.from_id({self._id!r})"
        )
        opts = [f"read_only={self._read_only}"] if self._read_only else []
        opts += [f"sub_path={self._sub_path!r}"] if self._sub_path is not None else []
        return f"{base}.with_mount_options({', '.join(opts)})" if opts else base
