"""Volumes inside a worker: each ``volumes={path: vol}`` mount made before the user's code is imported, and
committed when the container exits.

A mount is a working copy of the volume (:class:`~cloudmodal.volumes.working_copy.WorkingCopy`) in a private
directory of this worker, made visible at the mount path. How it is made visible, first that works:

1. **bind mount in a private mount namespace** (Linux, root or ``CAP_SYS_ADMIN``): the worker's main thread
   ``unshare(CLONE_NEWNS)``, makes every mount private to it, and binds the working copy at the path. Only this
   worker (its threads started afterwards, and the processes it starts) sees it there, so two containers on
   one machine can mount different volumes — or their own copies of one — at the same path, as in Modal;
   the host's file system is untouched except for the empty directory created as the mount point.
2. **a symbolic link** at the mount path, when it does not exist yet and its parent is writable by this user
   (e.g. a path under the home directory on a machine where workers do not run as root). One container per
   path per machine: a second one finds the path taken and fails with the fix.
3. otherwise a clear error naming both fixes.

No bubblewrap: the worker would have to re-execute itself inside it (and hand its credentials across), while
a mount namespace is one system call where the worker runs as root (a cloud node, a container) — the common
case — and the symlink covers an unprivileged user who picks a path they own.

Mount options (``Volume.with_mount_options``): ``sub_path`` makes the working copy hold only that directory of
the volume; ``read_only`` remounts the bind read-only (writes fail with ``EROFS``), or, for a symbolic link,
takes the write bits off the copy's files and directories (``PermissionError``; a root worker without a bind
mount ignores modes, and is warned); a read-only mount is never committed, and ``commit()`` on it raises.

Bucket mounts (:class:`cloudmodal.CloudBucketMount`): no FUSE driver here, so the bucket's prefix is downloaded
into a private directory (:class:`~cloudmodal.volumes.bucket_sync.BucketCopy`) made visible the same way;
a writable one's new, changed and deleted files are written back on the commits' cadence and at drain.

Commits, as Modal documents them: ``vol.commit()`` in the user's code; in the background every
:data:`AUTO_COMMIT_S` seconds while the container runs (when something changed); and :func:`commit_all` when
the worker drains. A container killed outright (SIGKILL, a lost node) loses what it changed since the last
commit; the published versions are never damaged (the engine's protocol).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloudmodal.client.transport import Transport
    from cloudmodal.spec import BucketMountSpec, FunctionSpec
    from cloudmodal.volumes.bucket_sync import BucketCopy
    from cloudmodal.volumes.engine import VolumeData
    from cloudmodal.volumes.working_copy import WorkingCopy

AUTO_COMMIT_S = 5.0  # how often a container's changes under its mounts are committed in the background
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RDONLY = 1
MS_REMOUNT = 32


class MountError(RuntimeError):
    """A volume could not be made visible at its mount path; the message says why and what to do."""


@dataclass
class Mount:
    """One mounted volume of this container."""

    path: str  # where the user's code sees it
    name: str | None
    volume_id: str
    data: VolumeData
    copy: WorkingCopy
    how: str  # "bind" or "symlink"
    read_only: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commit(self) -> int:
        if self.read_only:
            from cloudmodal.exception import InvalidError

            raise InvalidError(
                f"The volume {self.name or self.volume_id!r} is mounted read-only at {self.path!r} "
                "(with_mount_options(read_only=True)): commit() is refused and nothing it holds is published. "
                "Mount it without read_only to commit changes."
            )
        with self.lock:
            return self.copy.commit()

    def has_changes(self) -> bool:
        if self.read_only:
            return False
        with self.lock:
            return self.copy.has_changes()

    def reload(self) -> int:
        from cloudmodal.volumes.errors import VolumeBusyError

        with self.lock:
            if self.how == "bind":
                # Under a bind mount the open files show at the mount path, not at the working copy's own
                # (which the engine checks).
                busy = _open_in_this_namespace(self.path)
                if busy:
                    shown = ", ".join(sorted(busy)[:5])
                    raise VolumeBusyError(
                        f"cannot reload the volume at {self.path!r}: {len(busy)} open file(s) under it "
                        f"({shown}); close them and reload again"
                    )
            if self.read_only and self.how == "symlink":
                _set_writable(self.copy.directory, True)  # the copy's own writes; the user's stay refused
                try:
                    return self.copy.reload()
                finally:
                    _set_writable(self.copy.directory, False)
            return self.copy.reload()


@dataclass
class BucketMount:
    """One mounted bucket (:class:`cloudmodal.CloudBucketMount`) of this container."""

    path: str
    spec: BucketMountSpec
    copy: BucketCopy
    how: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def read_only(self) -> bool:
        return self.spec.read_only

    def has_changes(self) -> bool:
        if self.read_only:
            return False
        with self.lock:
            return self.copy.has_changes()

    def commit(self) -> int:
        """Write what changed back to the bucket (nothing for a read-only one); the files written or deleted."""
        if self.read_only:
            return 0
        with self.lock:
            r = self.copy.sync()
            return r.uploaded + r.deleted


def _set_writable(root: Path, writable: bool) -> None:
    """Put the write bits of the directories under ``root`` back (``writable``), or take them off every file
    and directory: how a read-only mount that is a symbolic link refuses writes (a bind mount is remounted
    read-only instead)."""
    for dirpath, _dirs, files in os.walk(root):
        paths = [dirpath] if writable else [dirpath, *(os.path.join(dirpath, f) for f in files)]
        for p in paths:
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if not os.path.islink(p):
                    os.chmod(p, (st.st_mode | 0o200) if writable else (st.st_mode & ~0o222))


def _open_in_this_namespace(path: str) -> set[str]:
    """Files under ``path`` held open by processes of this worker's mount namespace (another container's
    processes may hold files open at the same path in theirs: those are not this mount's)."""
    root = path.rstrip("/") + "/"
    try:
        mine = os.readlink("/proc/self/ns/mnt")
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return set()
    found: set[str] = set()
    for pid in pids:
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != mine:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(root):
                found.add(target[len(root) :])
    return found


_mounts: list[Mount] = []
_buckets: list[BucketMount] = []
_namespace_ready = False
_stop_auto_commit = threading.Event()
_auto_commit: threading.Thread | None = None


def _auto_commit_loop(interval: float) -> None:
    """Commit each mount that changed, every ``interval`` seconds, until :func:`commit_all` stops it. A failure
    is printed (once per mount until it succeeds again) and retried next time."""
    failing: set[str] = set()
    while not _stop_auto_commit.wait(interval):
        every: list[Mount | BucketMount] = [*_mounts, *_buckets]
        for m in every:
            if _stop_auto_commit.is_set():
                return
            try:
                if m.has_changes():  # never true of a read-only mount
                    m.commit()
                failing.discard(m.path)
            except Exception:
                if m.path not in failing:
                    failing.add(m.path)
                    sys.stderr.write(
                        f"cloudmodal: background commit of the {_what(m)} at {m.path} failed (retried every "
                        f"{interval:g} s):\n{traceback.format_exc()}"
                    )


def _what(m: Mount | BucketMount) -> str:
    return "volume" if isinstance(m, Mount) else f"bucket {m.spec.bucket_name}"


def mounts_of(name: str | None, volume_id: str | None) -> list[Mount]:
    """This container's mounts of the volume with this name or id."""
    return [
        m
        for m in _mounts
        if (name is not None and m.name == name) or (volume_id and m.volume_id == volume_id)
    ]


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _bind(source: Path, target: str, read_only: bool = False) -> None:
    """Bind ``source`` at ``target`` in this worker's own mount namespace (made on first use); ``read_only``:
    the bind is remounted read-only (the source stays writable through its own path)."""
    global _namespace_ready
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "mount namespaces are Linux's")
    if threading.current_thread() is not threading.main_thread():
        raise OSError(errno.EINVAL, "mounts are made from the worker's main thread")
    libc = _libc()
    if not _namespace_ready:
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # Nothing mounted here propagates back to the host (nor the host's later mounts to here).
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        _namespace_ready = True
    os.makedirs(target, exist_ok=True)
    _check(libc.mount(str(source).encode(), target.encode(), None, MS_BIND, None), f"mount --bind {target}")
    if read_only:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        rc = libc.mount(None, target.encode(), None, flags, None)
        if rc != 0:
            e = ctypes.get_errno()
            libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
            libc.umount2(target.encode(), 0)  # never leave it writable
            raise OSError(e, f"mount -o remount,bind,ro {target}: {os.strerror(e)}")


def _symlink(source: Path, target: str) -> None:
    if os.path.islink(target) and not os.path.exists(target):
        os.unlink(target)  # left by a container that died: its working copy is gone
    os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
    os.symlink(source, target)


def _make_visible(source: Path, target: str, read_only: bool = False) -> str:
    """Make ``source`` appear at ``target``: ``"bind"`` or ``"symlink"`` (see the module's docstring);
    ``read_only``: so that the user's writes there fail."""
    bind_error: OSError | None = None
    if os.path.lexists(target) and (os.path.islink(target) or not os.path.isdir(target)):
        pass  # a file or a link: binding over it would hide it from this container only; refuse below
    else:
        try:
            _bind(source, target, read_only)
            return "bind"
        except OSError as e:
            bind_error = e
    try:
        if read_only:
            _set_writable(source, False)
            if os.geteuid() == 0:
                sys.stderr.write(
                    f"cloudmodal: {target} is mounted read-only through a symbolic link, and this worker runs "
                    "as root, which file modes do not stop: writes there succeed locally (they are never "
                    "committed). Give the worker CAP_SYS_ADMIN to have a read-only bind mount instead.\n"
                )
        _symlink(source, target)
        return "symlink"
    except OSError as e:
        why = (
            f"binding it there failed ({bind_error.strerror})"
            if bind_error
            else f"{target!r} is not a directory"
        )
        raise MountError(
            f"Cannot mount the volume at {target!r}: {why}, and a symbolic link cannot be made there "
            f"({e.strerror}). Run the workers as root (a private mount namespace then binds the volume at any "
            f"path), or mount it at a path that does not exist yet in a directory this user ({os.getuid()}) "
            f"can write, e.g. volumes={{{str(Path.home() / 'data')!r}: vol}}."
        ) from e


def mount_volumes(t: Transport, spec: FunctionSpec) -> list[Mount]:
    """Mount every volume of ``spec`` (call from the main thread, before the user's code is imported).
    ``spec.create_volumes`` are created if missing."""
    from cloudmodal.volume import open_volume_data

    create = set(spec.create_volumes)
    for path, ref in spec.volumes:
        read_only, sub_path = spec.mount_options(path)
        row = t.post("/v1/volumes", {"name": ref, "mode": "lookup", "create_if_missing": ref in create})
        data = open_volume_data(t, row)
        workdir = Path(tempfile.mkdtemp(prefix=f"cloudmodal-volume-{row['id']}-"))
        copy = data.working_copy(workdir / "root", sub_path=sub_path, read_only=read_only)
        how = _make_visible(copy.directory, path, read_only)
        _mounts.append(Mount(path, row["name"], row["id"], data, copy, how, read_only))
    for b in spec.bucket_mounts:
        _buckets.append(mount_bucket(b))
    global _auto_commit
    if (_mounts or _buckets) and _auto_commit is None:
        _auto_commit = threading.Thread(
            target=_auto_commit_loop, args=(AUTO_COMMIT_S,), name="volume-commit", daemon=True
        )
        _auto_commit.start()
    return list(_mounts)


def mount_bucket(b: BucketMountSpec) -> BucketMount:
    """Download the bucket's prefix into a private directory and make it visible at ``b.path``. Credentials
    are this worker's environment's (the mount's secret is among the function's)."""
    from cloudmodal.volumes.bucket_sync import BucketCopy
    from cloudmodal.volumes.store import open_s3_bucket

    store = open_s3_bucket(
        b.bucket_name,
        b.key_prefix,
        dict(os.environ),
        endpoint_url=b.endpoint_url,
        requester_pays=b.requester_pays,
        force_path_style=b.force_path_style,
    )
    workdir = Path(tempfile.mkdtemp(prefix="cloudmodal-bucket-"))
    try:
        copy = BucketCopy(store, workdir / "root")
    except Exception as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise MountError(
            f"Cannot mount bucket {b.bucket_name!r} (prefix {b.key_prefix or '(none)'!r}) at {b.path!r}: {e}. "
            "Check the bucket name, bucket_endpoint_url, and the credentials of the mount's secret "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)."
        ) from e
    if copy.skipped:
        sys.stderr.write(
            f"cloudmodal: bucket {b.bucket_name}: {len(copy.skipped)} object(s) whose keys cannot be files were "
            f"not copied to {b.path} (e.g. {copy.skipped[0]!r})\n"
        )
    how = _make_visible(copy.directory, b.path, b.read_only)
    return BucketMount(b.path, b, copy, how)


def commit_all() -> None:
    """Commit every mount (the container is exiting), then remove the working copies. A failed commit is
    printed to the worker's log and the others still go out. Read-only mounts are left as they are."""
    _stop_auto_commit.set()
    if _auto_commit is not None:
        _auto_commit.join()  # its commit in progress, if any, finishes first
    every: list[Mount | BucketMount] = [*_buckets, *_mounts]
    for m in every:
        if m.read_only:
            continue
        try:
            m.commit()
        except Exception:
            sys.stderr.write(
                f"cloudmodal: committing the {_what(m)} at {m.path} failed:\n{traceback.format_exc()}"
            )
    for bm in list(_buckets):
        if bm.how == "symlink":
            with contextlib.suppress(OSError):
                if os.readlink(bm.path) == str(bm.copy.directory):
                    os.unlink(bm.path)
        _set_writable(bm.copy.directory, True)
        shutil.rmtree(bm.copy.directory.parent, ignore_errors=True)
    _buckets.clear()
    for m in list(_mounts):
        if m.how == "symlink":
            with contextlib.suppress(OSError):
                if os.readlink(m.path) == str(m.copy.directory):
                    os.unlink(m.path)
        with contextlib.suppress(Exception):
            m.data.close()
        if m.read_only:
            _set_writable(m.copy.directory, True)  # a non-root worker could not remove it otherwise
        shutil.rmtree(m.copy.directory.parent, ignore_errors=True)
    _mounts.clear()
