"""Blob store for payloads over the inline limit (a local directory here; an object store on clouds)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from cloudmodal.exception import NotFoundError

INLINE_LIMIT = 2 * 1024 * 1024  # payloads larger than this travel as blobs, never in SQL rows
MAX_BLOB_SIZE = 1024 * 1024 * 1024


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, blob_id: str) -> Path:
        if not blob_id.startswith("bl-") or not blob_id[3:].isalnum():
            raise NotFoundError(f"Invalid blob id {blob_id!r}.")
        return self.root / blob_id[3:5] / blob_id

    def put(self, data: bytes) -> str:
        blob_id = "bl-" + hashlib.sha256(data).hexdigest()[:40]
        path = self._path(blob_id)
        if path.exists():
            return blob_id
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return blob_id

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
