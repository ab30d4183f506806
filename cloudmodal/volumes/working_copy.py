"""A volume's working copy: one version written out into a directory (a container's mount), whose local
changes :meth:`WorkingCopy.commit` publishes and to which :meth:`WorkingCopy.reload` brings a newer version.
The commit and read rules are :mod:`cloudmodal.volumes.engine`'s."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
from pathlib import Path

from cloudmodal.volumes.engine import VolumeData
from cloudmodal.volumes.errors import VolumeBusyError, VolumeError
from cloudmodal.volumes.manifest import (
    DeletePath,
    DirRecord,
    FileRecord,
    MakeDir,
    Manifest,
    Op,
    PutFile,
    Record,
    normalize_path,
    parent_dirs,
)

PART_SIZE = 16 * 1024 * 1024  # bytes per part of a large file: each part is one blob with its own sha256
MAX_COMMIT_ATTEMPTS = 200  # swaps lost in a row before a commit gives up (CommitConflictError)
DEFAULT_CONCURRENCY = 8  # parts moved in parallel per upload/download

__all__ = ["WorkingCopy", "open_files_under"]


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a file looked like when it last matched the volume: any change to it changes one of these."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int

    @staticmethod
    def of(st: os.stat_result) -> _Seen:
        return _Seen(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stat.S_IMODE(st.st_mode))


class WorkingCopy:
    """A version of the volume written into a directory (a mount), with its local changes tracked.

    ``version`` is the volume version this directory was last synchronized with (by materializing,
    :meth:`commit` or :meth:`reload`). Only regular files and directories are tracked; symbolic links, sockets
    and the like are skipped. Not thread-safe: one owner per working copy.

    ``sub_path`` (normalized, e.g. ``"models/v2"``): the directory holds only that directory of the volume,
    and commits publish under it; one that does not exist yet starts empty (a file there is refused).
    ``read_only``: :meth:`commit` refuses and local changes are never looked for (:meth:`reload` brings the
    latest version in over them); keeping the directory itself unwritable is the mount's job.
    """

    def __init__(
        self, data: VolumeData, directory: Path, *, sub_path: str = "", read_only: bool = False
    ) -> None:
        self._data = data
        self.directory = directory
        self.read_only = read_only
        self.sub_path = normalize_path(sub_path)
        self._prefix = self.sub_path + "/" if self.sub_path else ""
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise FileExistsError(f"{str(directory)!r} is not empty: a volume mounts onto an empty directory")
        snap = data.snapshot()
        self.version = snap.version
        # The tree the directory had when last in sync (paths relative to sub_path), and each synced file's stat.
        self._base: dict[str, Record] = self._view(snap.manifest)
        self._seen: dict[str, _Seen] = {}
        for path, rec in sorted(self._base.items()):
            self._materialize(path, rec)

    def _view(self, m: Manifest) -> dict[str, Record]:
        """The manifest's entries under ``sub_path``, as paths relative to it."""
        if not self.sub_path:
            return dict(m.entries)
        if isinstance(m.get(self.sub_path), FileRecord):
            raise NotADirectoryError(
                f"sub_path {self.sub_path!r} is a file in the volume, not a directory: mount its directory"
            )
        n = len(self._prefix)
        return {p[n:]: r for p, r in m.entries.items() if p.startswith(self._prefix)}

    def _full(self, path: str) -> str:
        """A path of the directory as a path of the volume."""
        return self._prefix + path

    # local state

    def _local(self, path: str) -> Path:
        return self.directory / path

    def _materialize(self, path: str, rec: FileRecord | DirRecord) -> None:
        target = self._local(path)
        if isinstance(rec, DirRecord):
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, rec.mode)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: a process with the old file open keeps reading the old content.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".cloudmodal-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._data._parts.stream(rec, self._data._pool, self._data.concurrency):
                    f.write(chunk)
            os.chmod(tmp, rec.mode)
            os.utime(tmp, (rec.mtime, rec.mtime))
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(
                    target
                )  # a directory became a file remotely (reload checked it holds no local change)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._seen[path] = _Seen.of(os.stat(target))

    def _scan(self) -> tuple[dict[str, os.stat_result], set[str]]:
        """(regular files → stat, directories) under the directory, as volume paths."""
        files: dict[str, os.stat_result] = {}
        dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.directory):
            rel = os.path.relpath(dirpath, self.directory)
            base = "" if rel == "." else rel.replace(os.sep, "/")
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    dirnames.remove(d)  # never follow a link out of the mount
                    continue
                dirs.add(f"{base}/{d}" if base else d)
            for name in filenames:
                if name.startswith(".cloudmodal-"):
                    continue  # our own temporary file
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    files[f"{base}/{name}" if base else name] = st
        return files, dirs

    def _changes(self) -> tuple[dict[str, os.stat_result], set[str], set[str]]:
        """(changed or new files → stat, new directories, deleted paths) since the last sync (none when
        read-only: nothing local is ever published)."""
        if self.read_only:
            return {}, set(), set()
        files, dirs = self._scan()
        changed = {p: st for p, st in files.items() if self._seen.get(p) != _Seen.of(st)}
        known = self._base_dirs()
        new_dirs = {d for d in dirs if d not in known}
        deleted = {
            p
            for p, r in self._base.items()
            if (p not in files if isinstance(r, FileRecord) else p not in dirs)
        }
        return changed, new_dirs, deleted

    def _base_dirs(self) -> set[str]:
        """Directories of the synced tree: explicit ones and every parent of an entry."""
        dirs = {p for p, r in self._base.items() if isinstance(r, DirRecord)}
        for p in self._base:
            dirs.update(parent_dirs(p))
        return dirs

    def has_changes(self) -> bool:
        changed, new_dirs, deleted = self._changes()
        return bool(changed or new_dirs or deleted)

    # publish / refresh

    def commit(self) -> int:
        """Upload what changed in the directory since its last sync and publish it (one atomic version).
        Returns the new version, or the current one when nothing changed."""
        if self.read_only:
            raise VolumeError(
                "this volume is mounted read-only (with_mount_options(read_only=True)): commit() is refused; "
                "mount it without read_only to publish changes"
            )
        changed, new_dirs, deleted = self._changes()
        if not (changed or new_dirs or deleted):
            return self.version
        ops: list[Op] = []
        new_base = dict(self._base)
        seen_after: dict[str, _Seen] = {}
        for d in sorted(new_dirs):
            st = os.stat(self._local(d))
            rec_d = DirRecord(stat.S_IMODE(st.st_mode), st.st_mtime)
            ops.append(MakeDir(self._full(d), rec_d))
            new_base[d] = rec_d
        paths = sorted(changed)
        before = {p: os.stat(self._local(p)) for p in paths}
        records = self._data.upload_files([(self._local(p), stat.S_IMODE(before[p].st_mode)) for p in paths])
        for p, rec in zip(paths, records, strict=True):
            rec = dataclasses.replace(rec, mtime=before[p].st_mtime)
            old = self._base.get(p)
            if not (isinstance(old, FileRecord) and old.parts == rec.parts and old.mode == rec.mode):
                ops.append(PutFile(self._full(p), rec))
            new_base[p] = rec
            # Written to while we read it? Then it stays "changed" and goes out with the next commit.
            if _Seen.of(os.stat(self._local(p))) == _Seen.of(before[p]):
                seen_after[p] = _Seen.of(before[p])
        for p in sorted(deleted):
            ops.append(DeletePath(self._full(p)))
            new_base.pop(p, None)
        version = self._data.commit_ops(ops) if ops else self.version
        self._base = new_base
        for p in deleted:
            self._seen.pop(p, None)
        self._seen.update(seen_after)
        self.version = version
        return version

    def reload(self, *, check_open_files: bool = True) -> int:
        """Bring the directory to the latest version, keeping uncommitted local changes (they shadow the
        remote paths they touch). Raises ``VolumeBusyError`` while files under the directory are open."""
        if check_open_files:
            busy = open_files_under(self.directory)
            if busy:
                shown = ", ".join(sorted(busy)[:5])
                raise VolumeBusyError(
                    f"cannot reload {str(self.directory)!r}: {len(busy)} open file(s) under it ({shown}); "
                    "close them and reload again"
                )
        changed, new_dirs, deleted = self._changes()
        local = set(changed) | new_dirs | deleted
        snap = self._data.snapshot()
        latest = self._view(snap.manifest)
        # Remote removals first (deepest first), then additions and changes (parents first).
        for p in sorted(set(self._base) - set(latest), reverse=True):
            if p in local:
                continue
            target = self._local(p)
            if isinstance(self._base[p], FileRecord):
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                self._seen.pop(p, None)
            else:
                with contextlib.suppress(OSError):
                    target.rmdir()  # only when empty: local files inside stay
            # Parents that were directories only because of this entry go too (when empty).
            for parent in parent_dirs(p):
                if snap.manifest.is_dir(self._full(parent)) or parent in local:
                    break
                with contextlib.suppress(OSError):
                    self._local(parent).rmdir()
        deleted_dirs = [d for d in deleted if isinstance(self._base.get(d), DirRecord)]
        for p in sorted(latest):
            if p in local or any(p.startswith(d + "/") for d in deleted_dirs):
                continue  # a local change shadows the remote path
            if any(c.startswith(p + "/") for c in local):
                continue  # never replace a directory holding uncommitted local files
            rec = latest[p]
            if self._base.get(p) != rec or (isinstance(rec, FileRecord) and p not in self._seen):
                self._materialize(p, rec)
        self._base = dict(latest)
        self.version = snap.version
        return self.version


def open_files_under(directory: Path) -> set[str]:
    """Paths under ``directory`` that some process we can inspect holds open (Linux ``/proc``); empty set
    elsewhere."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    root = str(directory.resolve()) + os.sep
    found: set[str] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(root):
                found.add(target[len(root) :])
    return found
