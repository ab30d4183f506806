"""Blob store for payloads over the inline limit (a local directory here; an object store on clouds).

A blob's id is its content address (``bl-`` and the first 40 hex digits of its sha256). Uploads stream to a
temporary file beside the blobs while their hash is computed (:meth:`BlobStore.put_stream`), so a blob of any
allowed size costs the server a write buffer, not its size in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

from cloudmodal.exception import NotFoundError

INLINE_LIMIT = 2 * 1024 * 1024  # payloads larger than this travel as blobs, never in SQL rows
MAX_BLOB_SIZE = 1024 * 1024 * 1024
WRITE_CHUNK = 1024 * 1024  # an upload is written in parts of about this size
STALE_TMP_S = 24 * 3600  # an upload's temporary file older than this was left by a crash

_BLOB_ID = re.compile(r"bl-[0-9a-f]{40}")


def blob_id_of(digest: Any) -> str:
    return "bl-" + digest.hexdigest()[:40]


class BlobWriter:
    """One upload in progress: a temporary file and the running hash of what was written to it."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        fd, self.tmp = tempfile.mkstemp(dir=store.root, prefix=".tmp-")
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray) -> None:
        self.hash.update(data)
        self.file.write(data)
        self.size += len(data)

    def commit(self) -> str:
        """Make the upload a blob (durably) and answer its id; an identical blob already stored is kept."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        blob_id = blob_id_of(self.hash)
        path = self.store._path(blob_id)
        if path.exists():
            os.unlink(self.tmp)
            _touch(path)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(self.tmp, path)
        return blob_id

    def abort(self) -> None:
        self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        from cloudmodal.config import private_dir

        private_dir(self.root)  # 0700, also a directory an earlier version made 0755
        self._remove_stale_uploads()

    def _remove_stale_uploads(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for tmp in [*self.root.glob(".tmp-*"), *self.root.glob("*/.tmp-*")]:
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass  # another control plane sharing the directory took it

    def _path(self, blob_id: str) -> Path:
        if not _BLOB_ID.fullmatch(blob_id):
            raise NotFoundError(
                f"Invalid blob id {blob_id[:60]!r}: expected 'bl-' and 40 lowercase hex digits."
            )
        return self.root / blob_id[3:5] / blob_id

    def put(self, data: bytes) -> str:
        blob_id = blob_id_of(hashlib.sha256(data))
        if self._path(blob_id).exists():
            _touch(self._path(blob_id))
            return blob_id
        w = BlobWriter(self)
        try:
            w.write(data)
            return w.commit()
        except BaseException:
            w.abort()
            raise

    async def put_stream(self, chunks: AsyncIterable[bytes], run: Callable[..., Awaitable[Any]]) -> str:
        """Store a blob arriving in ``chunks``; file work goes through ``run`` (a thread pool), in parts of
        about WRITE_CHUNK bytes."""
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
            return str(await run(w.commit))
        except BaseException:
            w.abort()
            raise

    def get(self, blob_id: str) -> bytes:
        path = self._path(blob_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"Blob {blob_id} not found.") from None

    def path(self, blob_id: str) -> Path:
        p = self._path(blob_id)
        if not p.exists():
            raise NotFoundError(f"Blob {blob_id} not found.")
        return p


def _touch(path: Path) -> None:
    """A blob uploaded again is new again: retention (which goes by a file's age once nothing references it)
    must not delete it before the call that uploaded it refers to it."""
    with contextlib.suppress(OSError):
        os.utime(path)
