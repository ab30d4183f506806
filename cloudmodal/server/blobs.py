"""Blob store for payloads over the inline limit: a local directory, or a bucket behind the volumes' storage
protocol (:mod:`cloudmodal.volumes.store`), picked by :func:`open_blob_store` from ``CLOUDMODAL_BLOB_STORE``.

A blob's id is its content address (``bl-`` and the first 40 hex digits of its sha256). Uploads stream to a
temporary file while their hash is computed (:meth:`BlobStore.put_stream`), so a blob of any allowed size
costs the server a write buffer, not its size in memory; only then is its address known, and the file becomes
the blob: renamed into place in a directory, streamed up (multipart) to a bucket. Reads stream too
(:meth:`BlobStore.open_read`).

Retention (:mod:`cloudmodal.server.retention`) removes a blob no row references once it has been idle past a
grace: a blob is uploaded before the row that references it exists. Uploading an existing blob again must
therefore make it new again without copying it: a directory store touches the file; a bucket store writes a
small marker object beside it (objects' times cannot be changed), and a blob's age is that of the newer of
the two (:meth:`BlobStore.list_blobs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudmodal.exception import NotFoundError

if TYPE_CHECKING:
    from cloudmodal.volumes.store import ObjectStore

INLINE_LIMIT = 2 * 1024 * 1024  # payloads larger than this travel as blobs, never in SQL rows
MAX_BLOB_SIZE = 1024 * 1024 * 1024
WRITE_CHUNK = 1024 * 1024  # an upload is written in parts of about this size
READ_CHUNK = 1024 * 1024  # a directory blob is read in parts of this size
STALE_TMP_S = 24 * 3600  # an upload's temporary file older than this was left by a crash

# Keys in a bucket: top-level names of their own, so a prefix shared with volumes by mistake mixes nothing.
BLOB_PREFIX = "cp-blobs/"
TOUCH_PREFIX = "cp-blobs-touched/"

_BLOB_ID = re.compile(r"bl-[0-9a-f]{40}")

Run = Callable[..., Awaitable[Any]]  # runs blocking work off the event loop (the API's thread pool)


def blob_id_of(digest: Any) -> str:
    return "bl-" + digest.hexdigest()[:40]


def check_blob_id(blob_id: str) -> str:
    if not _BLOB_ID.fullmatch(blob_id):
        raise NotFoundError(f"Invalid blob id {blob_id[:60]!r}: expected 'bl-' and 40 lowercase hex digits.")
    return blob_id


def _not_found(blob_id: str) -> NotFoundError:
    return NotFoundError(f"Blob {blob_id} not found.")


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob, as retention sees it."""

    blob_id: str
    modified: float  # when it was last uploaded (seconds since the epoch): what its age is counted from
    size: int | None  # bytes, where the listing tells (a bucket's listing through ObjectStore does not)


class BlobWriter:
    """One upload in progress: a temporary file and the running hash of what was written to it."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        fd, self.tmp = tempfile.mkstemp(dir=store.spool_dir, prefix=".tmp-")
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.moved = False  # the file became the blob (renamed into place): nothing left to remove

    def write(self, data: bytes | bytearray) -> None:
        self.hash.update(data)
        self.file.write(data)
        self.size += len(data)

    def commit(self) -> str:
        """Make the upload a blob and answer its id; an identical blob already stored is kept (and is new
        again for retention). The temporary file is gone after, whatever happens."""
        try:
            return self.store._commit(self, blob_id_of(self.hash))
        finally:
            self.abort()

    def abort(self) -> None:
        self.file.close()
        if not self.moved:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


class BlobStore(ABC):
    """Content-addressed blobs. Subclasses keep them somewhere; uploads spool through ``spool_dir``."""

    url: str  # where the blobs are, for messages and logs (never holds credentials)
    spool_dir: Path  # uploads in progress (temporary files, 0700)
    # how often retention looks for garbage here: a directory is scanned every pass (cheap); a bucket's
    # listing is billed per request, and a day's grace makes an hourly look enough
    sweep_every_s: float = 0.0

    def _start_spool(self, spool_dir: Path) -> None:
        from cloudmodal.config import private_dir

        self.spool_dir = private_dir(spool_dir)  # 0700, also a directory an earlier version made 0755
        cutoff = time.time() - STALE_TMP_S
        for tmp in [*spool_dir.glob(".tmp-*"), *spool_dir.glob("*/.tmp-*")]:
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass  # another control plane sharing the directory took it

    @abstractmethod
    def _commit(self, w: BlobWriter, blob_id: str) -> str:
        """Store the writer's finished file as ``blob_id`` (the writer removes what is left of it after)."""

    def put(self, data: bytes) -> str:
        w = BlobWriter(self)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    async def put_stream(self, chunks: AsyncIterable[bytes], run: Run) -> str:
        """Store a blob arriving in ``chunks``; file and network work goes through ``run`` (a thread pool),
        in parts of about WRITE_CHUNK bytes."""
        w: BlobWriter = await run(BlobWriter, self)
        try:
            pending = bytearray()
            async for chunk in chunks:
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    part, pending = pending, bytearray()
                    await run(w.write, part)
            if pending:
                await run(w.write, pending)
        except BaseException:
            w.abort()
            raise
        return str(await run(w.commit))

    @abstractmethod
    def get(self, blob_id: str) -> bytes:
        """The whole blob (for tests and small reads; the API streams with :meth:`open_read`)."""

    @abstractmethod
    def open_read(self, blob_id: str) -> Iterator[bytes]:
        """The blob as chunks. A missing blob raises :class:`NotFoundError` here, before any chunk, so an
        answer can still be an error; later failures surface while iterating."""

    @abstractmethod
    def exists(self, blob_id: str) -> bool: ...

    @abstractmethod
    def list_blobs(self) -> Iterator[BlobInfo]:
        """Every blob, in no set order."""

    @abstractmethod
    def delete_if_idle(self, blob_id: str, cutoff: float) -> bool:
        """Remove a blob :meth:`list_blobs` listed as idle since before ``cutoff``, unless it was uploaded
        again at or after ``cutoff`` since; whether it was removed (False: kept, or already gone)."""

    def tidy(self, cutoff: float) -> None:  # noqa: B027 - most stores keep no bookkeeping
        """Remove bookkeeping that stopped mattering before ``cutoff`` (retention calls this each pass)."""


async def iterate(chunks: Iterator[bytes], run: Run) -> AsyncIterator[bytes]:
    """``chunks`` (blocking to produce) as an async stream, each step on ``run``'s thread pool."""
    try:
        while (chunk := await run(next, chunks, None)) is not None:
            yield chunk
    finally:
        # a download cut short releases its file or connection now (closing is quick: no thread hop); a step
        # still running on a thread after a cancellation leaves that to the garbage collector
        close = getattr(chunks, "close", None)
        if close is not None:
            with contextlib.suppress(ValueError):  # "generator already executing"
                close()


# --- a local directory ------------------------------------------------------------------------------------


class DirectoryBlobStore(BlobStore):
    """Blobs as files ``root/ab/bl-ab…``: an upload is renamed into place (after an fsync), so a blob is
    whole or absent, and the API sends a blob straight from its file (:meth:`path`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self._start_spool(self.root)

    def _path(self, blob_id: str) -> Path:
        return self.root / blob_id[3:5] / check_blob_id(blob_id)

    def _commit(self, w: BlobWriter, blob_id: str) -> str:
        path = self._path(blob_id)
        if path.exists():  # the copy being committed is dropped: no need to make it durable first
            _touch(path)
            return blob_id
        w.file.flush()
        os.fsync(w.file.fileno())  # whole on disk before its name says it is there
        w.file.close()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(w.tmp, path)
        w.moved = True
        return blob_id

    def get(self, blob_id: str) -> bytes:
        try:
            return self._path(blob_id).read_bytes()
        except FileNotFoundError:
            raise _not_found(blob_id) from None

    def path(self, blob_id: str) -> Path:
        p = self._path(blob_id)
        if not p.exists():
            raise _not_found(blob_id)
        return p

    def open_read(self, blob_id: str) -> Iterator[bytes]:
        try:
            f = self._path(blob_id).open("rb")
        except FileNotFoundError:
            raise _not_found(blob_id) from None
        return _read_file(f)

    def exists(self, blob_id: str) -> bool:
        return self._path(blob_id).is_file()

    def list_blobs(self) -> Iterator[BlobInfo]:
        for sub in self.root.iterdir() if self.root.exists() else ():
            if sub.is_dir() and len(sub.name) == 2:
                for p in sub.iterdir():
                    if p.name.startswith("bl-"):
                        try:
                            st = p.stat()
                        except FileNotFoundError:
                            continue  # another control plane sharing the directory removed it
                        yield BlobInfo(p.name, st.st_mtime, st.st_size)

    def delete_if_idle(self, blob_id: str, cutoff: float) -> bool:
        path = self._path(blob_id)
        try:
            if path.stat().st_mtime >= cutoff:  # uploaded again since it was listed
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def __repr__(self) -> str:
        return f"DirectoryBlobStore({self.url!r})"


def _read_file(f: Any) -> Iterator[bytes]:
    with f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def _touch(path: Path) -> None:
    """A blob uploaded again is new again: retention (which goes by a file's age once nothing references it)
    must not delete it before the call that uploaded it refers to it."""
    with contextlib.suppress(OSError):
        os.utime(path)


# --- a bucket (or any ObjectStore) ------------------------------------------------------------------------


class ObjectBlobStore(BlobStore):
    """Blobs as objects ``cp-blobs/ab/bl-ab…`` of an :class:`~cloudmodal.volumes.store.ObjectStore` (S3,
    GCS, Azure Blob, or a directory through it). Uploads spool to ``spool_dir`` and then stream up (multipart
    on clouds); an object already there is not uploaded again: a marker ``cp-blobs-touched/ab/bl-ab…`` records
    that it was (see the module's docstring)."""

    sweep_every_s = 3600.0

    def __init__(self, store: ObjectStore, spool_dir: Path) -> None:
        self.store = store
        self.url = store.url
        self._start_spool(spool_dir)

    def check(self) -> None:
        """Fail now, with what to fix, if the bucket cannot be listed (missing, or no credentials for it),
        rather than on the first payload over the inline limit."""
        from cloudmodal.exception import InvalidError
        from cloudmodal.volumes.errors import StoreError

        try:
            next(iter(self.store.list_modified(TOUCH_PREFIX)), None)
        except StoreError as exc:
            raise InvalidError(
                f"CLOUDMODAL_BLOB_STORE {self.url}: cannot list it ({_gist(exc)}). Check that the bucket "
                "exists and that this control plane's credentials may list, read, write and delete objects "
                "in it."
            ) from None

    @staticmethod
    def key(blob_id: str) -> str:
        return f"{BLOB_PREFIX}{blob_id[3:5]}/{check_blob_id(blob_id)}"

    @staticmethod
    def touch_key(blob_id: str) -> str:
        return f"{TOUCH_PREFIX}{blob_id[3:5]}/{check_blob_id(blob_id)}"

    def _commit(self, w: BlobWriter, blob_id: str) -> str:
        w.file.close()  # no fsync: the file is a way station, and the store's put is what must be durable
        key = self.key(blob_id)
        if self.store.exists(key):
            # the marker first, then look again: retention checks the marker just before it deletes, so it
            # either sees the marker and keeps the blob, or deleted it already and it is uploaded below (but
            # for one request's window between its check and its delete, as with a directory's touch)
            self.store.put(self.touch_key(blob_id), b"")
            if self.store.exists(key):
                return blob_id
        with open(w.tmp, "rb") as f:
            self.store.put(key, f)  # streamed from the file: multipart on clouds, never read whole
        return blob_id

    def get(self, blob_id: str) -> bytes:
        from cloudmodal.volumes.errors import KeyNotFoundError

        try:
            return self.store.get(self.key(blob_id))
        except KeyNotFoundError:
            raise _not_found(blob_id) from None

    def open_read(self, blob_id: str) -> Iterator[bytes]:
        from cloudmodal.volumes.errors import KeyNotFoundError

        chunks = self.store.open_read(self.key(blob_id))
        try:
            first = next(chunks)  # the request that finds out whether it exists
        except KeyNotFoundError:
            raise _not_found(blob_id) from None
        except StopIteration:
            return iter(())  # the empty blob
        return _prepend(first, chunks)

    def exists(self, blob_id: str) -> bool:
        return self.store.exists(self.key(blob_id))

    def _touched(self, prefix: str) -> dict[str, float]:
        return {key.rpartition("/")[2]: t for key, t in self.store.list_modified(prefix)}

    def list_blobs(self) -> Iterator[BlobInfo]:
        touched = self._touched(TOUCH_PREFIX)
        for key, modified in self.store.list_modified(BLOB_PREFIX):
            blob_id = key.rpartition("/")[2]
            if _BLOB_ID.fullmatch(blob_id):
                yield BlobInfo(blob_id, max(modified, touched.get(blob_id, 0.0)), None)

    def delete_if_idle(self, blob_id: str, cutoff: float) -> bool:
        touch_key = self.touch_key(blob_id)
        if self._touched(touch_key).get(blob_id, 0.0) >= cutoff:  # uploaded again since it was listed
            return False
        if not self.store.exists(self.key(blob_id)):
            return False  # another control plane sharing the bucket removed it
        self.store.delete(self.key(blob_id))
        self.store.delete(touch_key)
        return True

    def tidy(self, cutoff: float) -> None:
        # A marker older than the cutoff no longer changes any blob's fate (its age counts from before the
        # cutoff either way): markers of re-uploads, gone once their grace is over.
        for key, modified in self.store.list_modified(TOUCH_PREFIX):
            if modified < cutoff:
                self.store.delete(key)

    def __repr__(self) -> str:
        return f"ObjectBlobStore({self.url!r})"


def _gist(exc: Exception) -> str:
    """A store error in a line: SDKs append pages of request dumps; the cloud's error code says enough."""
    text = str(exc)
    code = re.search(r"<Code>([^<]{1,80})</Code>", text)
    head = text.splitlines()[0] if text else type(exc).__name__
    head = head if len(head) <= 300 else head[:300] + "…"
    return f"{head} [{code.group(1)}]" if code else head


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


def open_blob_store(location: str | os.PathLike[str], spool_dir: Path) -> BlobStore:
    """The blob store at ``location``: a directory path or ``file:///dir`` (blobs as files there), or any URL
    :func:`cloudmodal.volumes.store.open_store` accepts (``s3://bucket/prefix``, ``gs://…``, ``az://…``),
    with uploads spooled through ``spool_dir``."""
    text = os.fspath(location)
    if isinstance(location, os.PathLike) or "://" not in text:
        return DirectoryBlobStore(Path(text).expanduser())
    from cloudmodal.volumes.errors import StoreError
    from cloudmodal.volumes.store import LocalStore, open_store

    try:
        store = open_store(text)
    except StoreError as exc:
        from cloudmodal.exception import InvalidError

        raise InvalidError(f"CLOUDMODAL_BLOB_STORE: {exc}") from None
    if isinstance(store, LocalStore):  # file:///dir: the direct (faster) directory store
        return DirectoryBlobStore(store.root)
    blobs = ObjectBlobStore(store, spool_dir)
    blobs.check()
    return blobs


__all__ = [
    "INLINE_LIMIT",
    "MAX_BLOB_SIZE",
    "BlobInfo",
    "BlobStore",
    "DirectoryBlobStore",
    "ObjectBlobStore",
    "iterate",
    "open_blob_store",
]
