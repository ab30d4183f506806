"""The volume storage engine: versions of a file tree kept in an object store, published atomically.

Layout under the volume's store prefix (see :mod:`cloudmodal.volumes.store`)::

    blobs/<aa>/<sha256>              one part of a file's content (content-addressed, immutable)
    manifests/<version>-<hash>.json  one version's tree: path → size, mode, mtime, part hashes (immutable)

and a **head** (:class:`Head`: the control plane's database in production, :class:`FileHead` here) that names
the current version and its manifest. Nothing else is mutable.

Commit protocol
    1. upload the parts of every new or changed file (content-addressed: identical parts are one object);
    2. read the head (version ``v``), replay this commit's operations onto manifest ``v`` (pure:
       :func:`cloudmodal.volumes.manifest.apply_ops`) and write the result as a new manifest object;
    3. ``head.swap(v, key)`` — a compare-and-swap. If it fails another commit won: go to 2.

    Readers resolve the head once and read only immutable objects through it, so they see the old version
    or the new one, never a mix. A committer that dies before its swap (SIGKILL, lost node) leaves the head,
    and so every published version, untouched; its uploaded blobs and unpublished manifest are garbage that
    :meth:`VolumeData.gc` removes.

Two commits at once (the rule, as Modal's "last write wins")
    Every commit lands: the loser of the swap replays **its own changes** (its diff against the version it
    started from, or its batch's operations) onto the winner's manifest and swaps again. Paths only one of
    them changed keep that change; a path both changed ends up as the commit that published **later** left
    it (last write wins, per path — a file is never a mix of two writers). Each commit stays atomic. A
    working copy's diff names each path it deleted, so a directory one writer removed keeps the files another
    writer added to it meanwhile; a batch's ``remove(path, recursive=True)`` is resolved when it publishes and
    removes what is there then.

Reading through a cache
    With ``cache_dir``, every part read is kept under ``cache_dir/blobs/<sha256>`` (written only after its
    checksum matched) and read from there next time, so a worker on a cloud node downloads each part once.
    Every part is checked against its sha256, from the store or the cache (a damaged cache file is fetched
    again); a part damaged in the store raises :class:`~cloudmodal.volumes.errors.CorruptDataError` before
    any of its bytes are returned. The cache is never evicted here: it lives as long as its directory (a
    worker's scratch disk). Reads fetch up to ``concurrency`` parts ahead (memory: that many parts).

Working copies (mounts) and reload
    :meth:`VolumeData.working_copy` writes a version into a directory. :meth:`WorkingCopy.commit` publishes the
    directory's changes since then. :meth:`WorkingCopy.reload` brings in the latest version; as Modal's
    ``reload`` it refuses while a process holds a file under the directory open (``VolumeBusyError``), and
    **uncommitted local changes are kept**: a path changed, added or deleted locally shadows the remote
    version of that path until it is committed (they are not committed by the reload).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import os
import random
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from cloudmodal.volumes.errors import (
    CommitConflictError,
    CorruptDataError,
    KeyNotFoundError,
)
from cloudmodal.volumes.manifest import (
    Copy,
    DirRecord,
    FileRecord,
    MakeDir,
    Manifest,
    Op,
    PutFile,
    Remove,
    apply_ops,
    manifest_key,
    normalize_path,
)
from cloudmodal.volumes.store import ObjectStore

if TYPE_CHECKING:
    from cloudmodal.volumes.working_copy import WorkingCopy

PART_SIZE = 16 * 1024 * 1024  # bytes per part of a large file: each part is one blob with its own sha256
MAX_COMMIT_ATTEMPTS = 200  # swaps lost in a row before a commit gives up (CommitConflictError)
DEFAULT_CONCURRENCY = 8  # parts moved in parallel per upload/download

__all__ = [
    "PART_SIZE",
    "Batch",
    "FileEntry",
    "FileEntryType",
    "FileHead",
    "Head",
    "Snapshot",
    "VolumeData",
    "blob_key",
]


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


# --- head --------------------------------------------------------------------------------------------------


@runtime_checkable
class Head(Protocol):
    """A volume's current-version pointer; the control plane's database in production.

    Versions start at 0 (the empty volume, no manifest) and each successful swap adds one.
    """

    def read(self) -> tuple[int, str | None]:
        """``(version, manifest key)``; ``(0, None)`` for a volume never committed."""
        ...

    def swap(self, expected: int, manifest_key: str) -> bool:
        """Atomically: if the version is still ``expected``, make it ``expected + 1`` pointing at
        ``manifest_key`` and return True; otherwise change nothing and return False (another commit won)."""
        ...


class FileHead:
    """A :class:`Head` in a local JSON file: ``fcntl`` lock around read-compare-write, the write by temp file
    and ``rename`` with fsync, so a crash leaves either the old head or the new one. Processes on one machine
    (tests, the embedded control plane) share it safely; not for network file systems."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def read(self) -> tuple[int, str | None]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0, None
        return int(doc["version"]), doc["manifest"]

    def swap(self, expected: int, manifest_key: str) -> bool:
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                version, _ = self.read()
                if version != expected:
                    return False
                data = json.dumps({"version": expected + 1, "manifest": manifest_key}).encode()
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".head-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# --- listing -----------------------------------------------------------------------------------------------


class FileEntryType(enum.IntEnum):
    """Modal's ``FileEntryType`` values."""

    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One listing row, with Modal's ``FileEntry`` fields. ``path`` is relative to the volume root."""

    path: str
    type: FileEntryType
    mtime: int  # seconds since the epoch
    size: int  # bytes; 0 for directories


# --- reading -----------------------------------------------------------------------------------------------


class _Parts:
    """Fetches content parts by hash: from the cache when there, else from the store, verified."""

    def __init__(self, store: ObjectStore, cache_dir: Path | None) -> None:
        self.store = store
        self.cache = cache_dir / "blobs" if cache_dir is not None else None
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)

    def fetch(self, digest: str) -> bytes:
        if self.cache is not None:
            cached = self.cache / digest
            try:
                data = cached.read_bytes()
            except FileNotFoundError:
                pass
            else:
                if hashlib.sha256(data).hexdigest() == digest:
                    return data
                cached.unlink(missing_ok=True)  # a damaged cache file: fetch the part again
        try:
            data = self.store.get(blob_key(digest))
        except KeyNotFoundError:
            raise CorruptDataError(
                f"{self.store.url}: part {digest} of a committed file is missing from the store "
                "(deleted outside cloudmodal, or collected by a gc that kept too few versions)"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CorruptDataError(
                f"{self.store.url}: part {digest} is damaged (its content hashes to {actual}); "
                "the file cannot be read. Re-upload it to repair the volume."
            )
        if self.cache is not None:
            _atomic_write(self.cache / digest, data)
        return data

    def stream(self, record: FileRecord, pool: ThreadPoolExecutor, ahead: int) -> Iterator[bytes]:
        """The file's bytes part by part, fetching up to ``ahead`` parts in parallel, in order."""
        pending: deque[Future[bytes]] = deque()
        todo = iter(record.parts)
        try:
            for digest in todo:
                pending.append(pool.submit(self.fetch, digest))
                if len(pending) >= ahead:
                    break
            while pending:
                data = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self.fetch, nxt))
                yield data
        finally:
            for f in pending:
                f.cancel()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Snapshot:
    """One version of the volume, pinned: every read through it sees that version only."""

    def __init__(self, data: VolumeData, manifest: Manifest) -> None:
        self._data = data
        self.manifest = manifest
        self.version = manifest.version

    def listdir(self, path: str = "/", recursive: bool = False) -> list[FileEntry]:
        """Entries under directory ``path`` (or the one entry of a file), sorted by path; ``recursive`` walks
        the whole subtree. ``FileNotFoundError`` when ``path`` does not exist."""
        m = self.manifest
        root = normalize_path(path)
        rec = m.get(root)
        if isinstance(rec, FileRecord):
            return [FileEntry(root, FileEntryType.FILE, int(rec.mtime), rec.size)]
        if not m.is_dir(root):
            raise FileNotFoundError(f"{'/' + root!r} is not in the volume")
        prefix = root + "/" if root else ""
        rows: dict[str, FileEntry] = {}
        for p, r in m.entries.items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            depth = len(rest) if recursive else 1
            # Implicit parent directories of a deeper entry are listed too.
            for i in range(1, min(depth, len(rest)) + 1):
                sub = prefix + "/".join(rest[:i])
                if i < len(rest) and sub not in rows:
                    d = m.get(sub)
                    mt = int(d.mtime) if isinstance(d, DirRecord) else int(r.mtime)
                    rows[sub] = FileEntry(sub, FileEntryType.DIRECTORY, mt, 0)
            if len(rest) <= depth:
                if isinstance(r, FileRecord):
                    rows[p] = FileEntry(p, FileEntryType.FILE, int(r.mtime), r.size)
                else:
                    rows[p] = FileEntry(p, FileEntryType.DIRECTORY, int(r.mtime), 0)
        return [rows[k] for k in sorted(rows)]

    def stat(self, path: str) -> FileRecord | DirRecord | None:
        p = normalize_path(path)
        rec = self.manifest.get(p)
        if rec is None and self.manifest.is_dir(p):
            return DirRecord(0o755, 0.0)
        return rec

    def read_file(self, path: str) -> Iterator[bytes]:
        """The file's content in chunks (one per part). ``FileNotFoundError`` / ``IsADirectoryError`` are raised
        at the call, before iteration; a damaged part raises ``CorruptDataError`` when reached."""
        p = normalize_path(path)
        rec = self.manifest.get(p)
        if rec is None:
            if self.manifest.is_dir(p):
                raise IsADirectoryError(f"{'/' + p!r} is a directory")
            raise FileNotFoundError(f"{'/' + p!r} is not in the volume")
        if isinstance(rec, DirRecord):
            raise IsADirectoryError(f"{'/' + p!r} is a directory")
        return self._data._parts.stream(rec, self._data._pool, self._data.concurrency)

    def read_bytes(self, path: str) -> bytes:
        return b"".join(self.read_file(path))


# --- the volume --------------------------------------------------------------------------------------------


class VolumeData:
    """A volume's data: ``store`` holds its blobs and manifests, ``head`` names the current version.

    Thread-safe; open one per volume per process and share it. Every method reads the head afresh (use
    :meth:`snapshot` to pin one version across several reads).
    """

    def __init__(
        self,
        store: ObjectStore,
        head: Head,
        cache_dir: Path | None = None,
        *,
        part_size: int = PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if part_size < 1:
            raise ValueError("part_size must be positive")
        self.store = store
        self.head = head
        self.part_size = part_size
        self.concurrency = max(1, concurrency)
        self._clock = clock
        self._parts = _Parts(store, Path(cache_dir) if cache_dir is not None else None)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency * 2, thread_name_prefix="volume-io")
        self._manifests: dict[str, Manifest] = {}  # manifest key → decoded (immutable, so cacheable)
        self._lock = threading.Lock()
        self._uploading: dict[str, _Upload] = {}  # part digest → its upload in flight

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> VolumeData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reading

    def load_manifest(self, key: str | None, version: int = 0) -> Manifest:
        if key is None:
            return Manifest(version)
        with self._lock:
            cached = self._manifests.get(key)
        if cached is not None:
            return cached
        try:
            m = Manifest.decode(self.store.get(key))
        except KeyNotFoundError:
            raise CorruptDataError(
                f"{self.store.url}: the head names manifest {key!r}, which is missing"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptDataError(f"{self.store.url}: manifest {key!r} is unreadable: {exc}") from exc
        with self._lock:
            self._manifests[key] = m
        return m

    def snapshot(self) -> Snapshot:
        """The current version, pinned."""
        version, key = self.head.read()
        return Snapshot(self, self.load_manifest(key, version))

    @property
    def version(self) -> int:
        return self.head.read()[0]

    def listdir(self, path: str = "/", recursive: bool = False) -> list[FileEntry]:
        return self.snapshot().listdir(path, recursive)

    def read_file(self, path: str) -> Iterator[bytes]:
        return self.snapshot().read_file(path)

    # writing

    def upload(self, source: BinaryIO | Path | str, *, mode: int | None = None) -> FileRecord:
        """Store a file's content as parts, ``concurrency`` at a time (memory: that many parts); returns its
        record, not yet published. ``mode`` defaults to the file's permission bits (0o644 for a stream)."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            st = path.stat()
            with path.open("rb") as f:
                rec = self.upload(f, mode=stat.S_IMODE(st.st_mode) if mode is None else mode)
            return dataclasses.replace(rec, mtime=st.st_mtime)
        digests: list[Future[str]] = []
        size = 0
        inflight: deque[Future[str]] = deque()
        while True:
            chunk = _read_full(source, self.part_size)
            if not chunk:
                break  # an empty file has no parts
            size += len(chunk)
            fut = self._pool.submit(self._put_part, chunk)
            digests.append(fut)
            inflight.append(fut)
            while len(inflight) >= self.concurrency:  # bound memory: concurrency × part_size
                inflight.popleft().result()
            if len(chunk) < self.part_size:
                break
        parts = tuple(f.result() for f in digests)
        return FileRecord(size, 0o644 if mode is None else mode, self._clock(), parts, self.part_size)

    def upload_files(self, files: list[tuple[Path, int | None]]) -> list[FileRecord]:
        """:meth:`upload` for many local files (path, mode or None), in order. Files of one part go up
        ``concurrency`` at a time (one round trip each would otherwise serialize a tree of small files);
        larger ones one after the other, each with its parts in parallel, so memory stays bounded by
        ``concurrency`` parts either way."""
        records: list[FileRecord | Future[FileRecord] | None] = [None] * len(files)
        small: list[int] = []
        for i, (path, _) in enumerate(files):
            if path.stat().st_size <= self.part_size:
                small.append(i)
        with ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="volume-files"
        ) as files_pool:
            for i in small:
                path, mode = files[i]
                records[i] = files_pool.submit(self.upload, path, mode=mode)
            for i, (path, mode) in enumerate(files):
                if records[i] is None:
                    records[i] = self.upload(path, mode=mode)
            return [r.result() if isinstance(r, Future) else r for r in records if r is not None]

    def _put_part(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        # Always written, even when the key may exist: a content-addressed put is idempotent, it saves a
        # round trip per part, and re-uploading a file repairs a part damaged in the store. Identical parts in
        # this process (copies, repeated content) wait for the first upload instead of racing it.
        with self._lock:
            upload = self._uploading.setdefault(digest, _Upload())
        with upload.lock:
            if not upload.done:
                self.store.put(blob_key(digest), data)
                upload.done = True
                with self._lock:
                    self._uploading.pop(digest, None)
        return digest

    def commit_ops(self, ops: list[Op], *, on_attempt: Callable[[int], None] | None = None) -> int:
        """Publish ``ops`` onto the head (retrying on lost swaps, as the module docstring says); the new
        version. Path errors (``FileNotFoundError`` …) raised by an op publish nothing."""
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            if on_attempt is not None:
                on_attempt(attempt)
            version, key = self.head.read()
            base = self.load_manifest(key, version)
            new = apply_ops(base, ops, version=version + 1, now=self._clock(), parent=key)
            data = new.encode()
            new_key = manifest_key(version + 1, data)
            self.store.put(new_key, data)
            if self.head.swap(version, new_key):
                with self._lock:
                    self._manifests[new_key] = new
                return version + 1
            self.store.delete(new_key)  # never published; the next attempt writes its own
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** min(attempt, 6))))  # jitter: spread the racers
        raise CommitConflictError(
            f"{self.store.url}: gave up after {MAX_COMMIT_ATTEMPTS} lost races with other commits; retry later"
        )

    def batch(self, *, force: bool = True) -> Batch:
        """A set of changes published as one commit by :meth:`Batch.commit` (or on leaving ``with``).
        With ``force=False`` a ``put_file`` onto an existing path fails (``FileExistsError``), as Modal's
        ``batch_upload(force=False)``."""
        return Batch(self, force=force)

    def working_copy(
        self, directory: Path | str, *, sub_path: str = "", read_only: bool = False
    ) -> WorkingCopy:
        """Write the current version (or its directory ``sub_path``) into ``directory`` (created; must be
        empty) and return its handle; ``read_only``: one that never commits."""
        from cloudmodal.volumes.working_copy import WorkingCopy

        return WorkingCopy(self, Path(directory), sub_path=sub_path, read_only=read_only)

    # maintenance

    def gc(
        self, keep_versions: int = 10, *, keep_s: float = 0.0, grace_s: float = 24 * 3600
    ) -> tuple[int, int]:
        """Delete the manifests of old versions and every blob that no kept manifest uses; returns
        ``(manifests, blobs)`` deleted.

        Kept: the head, the ``keep_versions`` newest versions (the head among them), and every older version
        that was still the head less than ``keep_s`` seconds ago (its successor was committed since then): a
        reader that resolved the head then may still be reading that version's parts. A reader pinned to a
        version gc dropped gets ``CorruptDataError`` for parts gone from the store (parts in its local cache
        still read).

        Commits take no lock, so an unreferenced object may belong to a commit in flight (uploaded, not yet
        published): only objects older than ``grace_s`` seconds are deleted, which must exceed the longest
        commit (as git's ``gc.pruneExpire``). A commit re-writes every part it uses, even one the store holds
        already, so a part an old version shared with a commit in flight is young again."""
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1 (the current version)")
        version, head_key = self.head.read()
        now = self._clock()
        cutoff = now - grace_s
        keep: set[str] = set()
        key = head_key
        superseded_at: float | None = None  # when the version being looked at stopped being the head
        while key is not None:  # the published chain, newest first, through each manifest's parent
            try:
                m = self.load_manifest(key)
            except CorruptDataError:
                if key == head_key:
                    raise  # never collect against a head that cannot be read
                break  # an older version an earlier gc dropped: the chain ends here
            recent = superseded_at is None or (keep_s > 0 and superseded_at > now - keep_s)
            if m.version <= version - keep_versions and not recent:
                break  # every older version was superseded earlier still
            keep.add(key)
            superseded_at = m.created
            key = m.parent
        used: set[str] = set()
        for k in keep:
            used |= self.load_manifest(k).blobs()
        dropped_manifests = dropped_blobs = 0
        for k, modified in list(self.store.list_modified("manifests/")):
            if k not in keep and modified < cutoff:
                self.store.delete(k)
                with self._lock:
                    self._manifests.pop(k, None)
                dropped_manifests += 1
        for k, modified in list(self.store.list_modified("blobs/")):
            if k.rsplit("/", 1)[-1] not in used and modified < cutoff:
                self.store.delete(k)
                dropped_blobs += 1
        return dropped_manifests, dropped_blobs

    def destroy(self) -> None:
        """Delete every object of the volume from its store (the head is the caller's to drop)."""
        for prefix in ("manifests/", "blobs/"):
            for k in list(self.store.list(prefix)):
                self.store.delete(k)


class _Upload:
    """One part's upload in flight; others with the same digest wait on ``lock`` and then skip."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, looping over short reads (pipes, sockets)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# --- batch -------------------------------------------------------------------------------------------------


class Batch:
    """Changes collected, then published together. Content is uploaded as each ``put_*`` is called; the
    operations are replayed onto the head at :meth:`commit` (so ``remove`` and ``copy`` see the latest
    version). Usable as a context manager: leaving the block without an error commits."""

    def __init__(self, data: VolumeData, *, force: bool) -> None:
        self._data = data
        self._force = force
        self._ops: list[Op] = []
        self.committed: int | None = None

    def put_file(
        self, local_file: str | os.PathLike[str] | BinaryIO, remote_path: str, mode: int | None = None
    ) -> None:
        """Upload a local file (path or binary file object) to ``remote_path``; ``mode`` defaults to the local
        file's permission bits (0o644 for a file object)."""
        path = normalize_path(remote_path)
        if path == "":
            raise IsADirectoryError("put_file needs a file path, not the volume's root '/'")
        if isinstance(local_file, (str, os.PathLike)):
            src = Path(local_file)
            if src.is_dir():
                raise IsADirectoryError(f"{str(src)!r} is a directory: use put_directory")
            rec = self._data.upload(src, mode=mode)
        else:
            rec = self._data.upload(local_file, mode=mode)
        self._ops.append(PutFile(path, rec, overwrite=self._force))

    def put_directory(
        self, local_path: str | os.PathLike[str], remote_path: str, recursive: bool = True
    ) -> None:
        """Upload the files of ``local_path`` under ``remote_path`` (subdirectories too unless ``recursive``
        is False). Symbolic links are followed only to files."""
        src = Path(local_path)
        if not src.is_dir():
            raise NotADirectoryError(f"{str(src)!r} is not a directory")
        root = normalize_path(remote_path)
        files: list[tuple[Path, str]] = []  # (local file, volume path)
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            base = root if rel == "." else "/".join(p for p in (root, rel.replace(os.sep, "/")) if p)
            if base:
                st = os.stat(dirpath)
                self._ops.append(MakeDir(base, DirRecord(stat.S_IMODE(st.st_mode), st.st_mtime)))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if full.is_file():
                    files.append((full, f"{base}/{name}" if base else name))
            if not recursive:
                dirnames.clear()
        records = self._data.upload_files([(full, None) for full, _ in files])
        for (_, remote), rec in zip(files, records, strict=True):
            self._ops.append(PutFile(remote, rec, overwrite=self._force))

    def remove(self, path: str, recursive: bool = False) -> None:
        self._ops.append(Remove(normalize_path(path), recursive))

    def copy(self, srcs: Iterable[str], dst: str, recursive: bool = False) -> None:
        sources = tuple(normalize_path(s) for s in ([srcs] if isinstance(srcs, str) else srcs))
        if "" in sources:
            raise ValueError("cannot copy the volume's root '/'")
        self._ops.append(Copy(sources, normalize_path(dst), dst.endswith("/"), recursive))

    def commit(self) -> int:
        """Publish everything as one new version; its number. A batch commits once."""
        if self.committed is not None:
            raise RuntimeError("this batch was committed already; start a new one")
        self.committed = self._data.commit_ops(self._ops)
        return self.committed

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and self.committed is None:
            self.commit()
