"""A bucket prefix copied into a directory, and the directory's changes written back: what a
:class:`cloudmodal.CloudBucketMount` is in a container (no FUSE driver there; see its docstring).

:class:`BucketCopy` downloads every object under the store's prefix into the directory (``key`` →
``directory/key``), remembers each file's stat as it wrote it, and :meth:`BucketCopy.sync` uploads the files
created or changed since and deletes from the bucket the objects whose files were deleted here. It never deletes
an object it did not download or upload itself: objects other writers add meanwhile are left alone.

Keys that cannot be files (``a//b``, ``../x``, a "directory marker" ending in ``/``, a key that is also the
prefix of another key) are skipped and counted in :attr:`BucketCopy.skipped`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cloudmodal.volumes.errors import KeyNotFoundError
from cloudmodal.volumes.store import ObjectStore

__all__ = ["BucketCopy", "SyncResult"]


@dataclasses.dataclass(frozen=True)
class SyncResult:
    uploaded: int  # files uploaded (new or changed)
    deleted: int  # objects deleted (their files were deleted here)


@dataclasses.dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int
    ino: int

    @staticmethod
    def of(st: os.stat_result) -> _Seen:
        return _Seen(st.st_size, st.st_mtime_ns, st.st_ino)


def _usable(key: str) -> bool:
    parts = key.split("/")
    return (
        bool(key)
        and not key.startswith("/")
        and "\\" not in key
        and "\x00" not in key
        and not any(p in ("", ".", "..") for p in parts)
    )


class BucketCopy:
    """The objects of ``store`` as files under ``directory`` (created; must be empty)."""

    def __init__(self, store: ObjectStore, directory: Path, *, concurrency: int = 16) -> None:
        self.store = store
        self.directory = directory
        self.skipped: list[str] = []
        self._seen: dict[str, _Seen] = {}  # key → its file's stat when it last matched the bucket
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{str(directory)!r} is not empty: a bucket mounts onto an empty directory")
        keys = sorted(k for k, _ in store.list_modified(""))
        dirs = {k.rsplit("/", i)[0] for k in keys for i in range(1, k.count("/") + 1)}
        wanted = []
        for key in keys:
            if not _usable(key) or key in dirs:
                self.skipped.append(key)
            else:
                wanted.append(key)
        # One round trip per object: several at once (the store releases the GIL while it waits).
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bucket-io") as pool:
            for _ in pool.map(self._download, wanted):
                pass

    def _download(self, key: str) -> None:
        target = self.directory / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".cloudmodal-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self.store.open_read(key):
                    f.write(chunk)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except KeyNotFoundError:
            os.unlink(tmp)  # deleted since it was listed
            return
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._seen[key] = _Seen.of(os.stat(target))

    def _scan(self) -> dict[str, os.stat_result]:
        files: dict[str, os.stat_result] = {}
        for dirpath, dirnames, filenames in os.walk(self.directory):
            rel = os.path.relpath(dirpath, self.directory)
            base = "" if rel == "." else rel.replace(os.sep, "/")
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                if name.startswith(".cloudmodal-"):
                    continue
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    files[f"{base}/{name}" if base else name] = st
        return files

    def has_changes(self) -> bool:
        files = self._scan()
        return any(self._seen.get(k) != _Seen.of(st) for k, st in files.items()) or any(
            k not in files for k in self._seen
        )

    def sync(self) -> SyncResult:
        """Upload the files created or changed here since the last sync; delete the objects of files deleted
        here. A file written to while it uploads stays changed and goes again next time."""
        files = self._scan()
        uploaded = deleted = 0
        for key, st in sorted(files.items()):
            if self._seen.get(key) == _Seen.of(st):
                continue
            with open(self.directory / key, "rb") as f:
                self.store.put(key, f)
            uploaded += 1
            # Written to while it went up? Then it stays "changed" (a stat no file has) and goes again.
            same = _Seen.of(os.stat(self.directory / key)) == _Seen.of(st)
            self._seen[key] = _Seen.of(st) if same else _Seen(-1, -1, -1)
        for key in sorted(set(self._seen) - set(files)):
            self.store.delete(key)
            del self._seen[key]
            deleted += 1
        return SyncResult(uploaded, deleted)
