"""A volume version as data: the manifest (path → file or directory record) and the pure operations that
turn one manifest into the next. No I/O here; :mod:`cloudmodal.volumes.engine` stores and publishes them.

Paths inside a volume are normalized to relative POSIX form without a leading ``/`` (``"a/b.txt"``; the root
is ``""``). A file record lists the sha256 of each of its parts (content-addressed blobs); a directory record
exists for directories created explicitly (empty ones included) — the parents of files are directories too,
implicitly.

Operations (:data:`Op`) are replayed, in order, onto whatever manifest is the head when a commit publishes,
so two commits that raced both land (see the engine's docstring for the rule).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1  # manifest document format; bump on incompatible change and keep reading the old one

__all__ = [
    "Copy",
    "DeletePath",
    "DirRecord",
    "FileRecord",
    "MakeDir",
    "Manifest",
    "Op",
    "PutFile",
    "Remove",
    "apply_ops",
    "manifest_key",
    "normalize_path",
]


_PART = re.compile(r"[0-9a-f]{64}")


def normalize_path(path: str) -> str:
    """``"/a//b/./c/"`` → ``"a/b/c"``; ``"/"`` → ``""``. Refuses paths that climb out of the volume."""
    if not isinstance(path, str):
        raise TypeError(f"a volume path is a str, not {type(path).__name__}")
    if "\x00" in path:
        raise ValueError(f"invalid volume path {path!r}: NUL byte")
    norm = posixpath.normpath("/" + path.replace("\\", "/"))
    if path and ".." in path.replace("\\", "/").split("/"):
        raise ValueError(f"invalid volume path {path!r}: '..' is not allowed")
    return norm.lstrip("/")


def _normal(path: object) -> bool:
    """Whether ``path`` is a normal path inside a volume as :func:`normalize_path` makes them."""
    try:
        return isinstance(path, str) and bool(path) and normalize_path(path) == path
    except ValueError:
        return False


def parent_dirs(path: str) -> Iterable[str]:
    """``"a/b/c"`` → ``"a/b"``, ``"a"`` (not the root)."""
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):
        yield "/".join(parts[:i])


@dataclass(frozen=True)
class FileRecord:
    size: int  # bytes
    mode: int  # permission bits (0o644 …)
    mtime: float  # seconds since the epoch, as the file had when it was committed
    parts: tuple[str, ...]  # sha256 hex of each part, in order; () for an empty file
    part_size: int  # every part but the last holds exactly this many bytes

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "mode": self.mode, "mtime": self.mtime, "parts": list(self.parts),
                "part_size": self.part_size}  # fmt: skip

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> FileRecord:
        # A manifest is read from the store, where any holder of the bucket's credentials could have written
        # it: part names become store keys and modes become files' permissions, so both are checked.
        parts = tuple(d["parts"])
        if not all(isinstance(h, str) and _PART.fullmatch(h) for h in parts):
            raise ValueError("invalid manifest: a part name is not a sha256 hex digest")
        size, part_size = int(d["size"]), int(d["part_size"])
        if size < 0 or (parts and part_size <= 0):
            raise ValueError("invalid manifest: a negative size or an empty part size")
        return FileRecord(size, int(d["mode"]) & 0o777, float(d["mtime"]), parts, part_size)


@dataclass(frozen=True)
class DirRecord:
    mode: int
    mtime: float

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "mtime": self.mtime}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> DirRecord:
        return DirRecord(int(d["mode"]) & 0o777, float(d["mtime"]))


Record = FileRecord | DirRecord


@dataclass(frozen=True)
class Manifest:
    """One published version of a volume. Immutable; ``entries`` holds files and explicit directories."""

    version: int
    entries: Mapping[str, Record] = field(default_factory=dict)
    parent: str | None = None  # the manifest key this one was built on (history, gc)
    created: float = 0.0

    def get(self, path: str) -> Record | None:
        return self.entries.get(path)

    def is_dir(self, path: str) -> bool:
        if path == "":
            return True
        if isinstance(self.entries.get(path), DirRecord):
            return True
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.entries)

    def under(self, path: str) -> list[str]:
        """Every entry strictly below directory ``path``."""
        if path == "":
            return list(self.entries)
        prefix = path + "/"
        return [p for p in self.entries if p.startswith(prefix)]

    def files(self) -> dict[str, FileRecord]:
        return {p: r for p, r in self.entries.items() if isinstance(r, FileRecord)}

    def blobs(self) -> set[str]:
        return {h for r in self.entries.values() if isinstance(r, FileRecord) for h in r.parts}

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "entries": {p: {"file" if isinstance(r, FileRecord) else "dir": r.to_json()}
                        for p, r in sorted(self.entries.items())},
        }  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> Manifest:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"manifest format {doc.get('format')!r} is not {FORMAT}: upgrade cloudmodal")
        entries: dict[str, Record] = {}
        for p, r in doc["entries"].items():
            # paths become files under a mount: only normal, relative paths inside the volume
            if not _normal(p):
                raise ValueError(f"invalid manifest: entry path {p!r} is not a normal path inside the volume")
            entries[p] = FileRecord.from_json(r["file"]) if "file" in r else DirRecord.from_json(r["dir"])
        return Manifest(int(doc["version"]), entries, doc.get("parent"), float(doc.get("created", 0.0)))


def manifest_key(version: int, data: bytes) -> str:
    """Where a manifest lives: its version for ordering, its content hash so two racers never collide."""
    return f"manifests/{version:012d}-{hashlib.sha256(data).hexdigest()[:16]}.json"


# --- operations --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PutFile:
    """Set ``path`` to a file (uploaded already); replaces a file there unless ``overwrite`` is False."""

    path: str
    record: FileRecord
    overwrite: bool = True


@dataclass(frozen=True)
class MakeDir:
    path: str
    record: DirRecord


@dataclass(frozen=True)
class DeletePath:
    """Drop exactly ``path`` if present (a working copy's diff lists every deleted path itself)."""

    path: str


@dataclass(frozen=True)
class Remove:
    """``rm [-r] path``, resolved against the manifest the commit lands on."""

    path: str
    recursive: bool = False


@dataclass(frozen=True)
class Copy:
    """``cp [-r] srcs… dst`` with cp's rules: one source onto a path that is not a directory (and does not end
    in ``/``) is copied to that path; otherwise every source goes into ``dst/<basename>``."""

    srcs: tuple[str, ...]
    dst: str
    dst_is_dir_hint: bool = False  # dst was written with a trailing "/"
    recursive: bool = False


Op = PutFile | MakeDir | DeletePath | Remove | Copy


def _put(entries: dict[str, Record], path: str, record: Record) -> None:
    if path == "":
        raise IsADirectoryError("cannot put a file at the volume's root '/'")
    # A file where a directory was, or a directory's name taken by a file among the parents: cp/Modal
    # semantics say the new write wins, so clear what is in the way.
    if isinstance(record, FileRecord):
        for p in [p for p in entries if p.startswith(path + "/")]:
            del entries[p]
    for parent in parent_dirs(path):
        if isinstance(entries.get(parent), FileRecord):
            del entries[parent]
    entries[path] = record


def apply_ops(base: Manifest, ops: Iterable[Op], *, version: int, now: float, parent: str | None) -> Manifest:
    """The manifest after ``ops``, replayed in order onto ``base``. Raises ``FileNotFoundError`` /
    ``IsADirectoryError`` / ``FileExistsError`` for an operation that cannot apply (nothing is published)."""
    entries: dict[str, Record] = dict(base.entries)
    view = Manifest(base.version, entries)  # live view over ``entries`` for the is_dir/under look-ups
    for op in ops:
        if isinstance(op, PutFile):
            existing = entries.get(op.path)
            if not op.overwrite and existing is not None:
                raise FileExistsError(
                    f"{'/' + op.path!r} already exists in the volume (pass force=True to replace)"
                )
            if isinstance(existing, DirRecord) or (existing is None and op.path and view.is_dir(op.path)):
                if not op.overwrite:
                    raise FileExistsError(f"{'/' + op.path!r} is a directory in the volume")
            _put(entries, op.path, op.record)
        elif isinstance(op, MakeDir):
            if op.path and not isinstance(entries.get(op.path), DirRecord):
                _put(entries, op.path, op.record)
        elif isinstance(op, DeletePath):
            entries.pop(op.path, None)
        elif isinstance(op, Remove):
            _remove(view, entries, op)
        else:
            _copy(view, entries, op)
    return Manifest(version, entries, parent, now)


def _remove(view: Manifest, entries: dict[str, Record], op: Remove) -> None:
    path = op.path
    if path == "" and not op.recursive:
        raise IsADirectoryError("'/' is the volume's root: remove it with recursive=True")
    if isinstance(entries.get(path), FileRecord):
        del entries[path]
        return
    if not view.is_dir(path):
        raise FileNotFoundError(f"{'/' + path!r} is not in the volume")
    below = view.under(path)
    if below and not op.recursive:
        raise IsADirectoryError(f"{'/' + path!r} is a non-empty directory: remove it with recursive=True")
    for p in below:
        del entries[p]
    entries.pop(path, None)


def _copy(view: Manifest, entries: dict[str, Record], op: Copy) -> None:
    if not op.srcs:
        raise ValueError("copy needs at least one source path")
    dst_is_dir = op.dst == "" or op.dst_is_dir_hint or view.is_dir(op.dst)
    if len(op.srcs) > 1 and not dst_is_dir:
        raise NotADirectoryError(f"copying several paths needs a directory destination, not {'/' + op.dst!r}")
    for src in op.srcs:
        base_name = posixpath.basename(src)
        target = posixpath.join(op.dst, base_name) if dst_is_dir else op.dst
        if isinstance(entries.get(src), FileRecord):
            if target == src:
                continue
            _put(entries, target, entries[src])
            continue
        if not view.is_dir(src):
            raise FileNotFoundError(f"{'/' + src!r} is not in the volume")
        if not op.recursive:
            raise IsADirectoryError(f"{'/' + src!r} is a directory: copy it with recursive=True")
        if target == src or target.startswith(src + "/"):
            raise ValueError(f"cannot copy {'/' + src!r} into itself ({'/' + target!r})")
        snapshot = {p: entries[p] for p in view.under(src)}
        if isinstance(entries.get(src), DirRecord):
            _put(entries, target, entries[src])
        for p, rec in snapshot.items():
            _put(entries, target + p[len(src) :], rec)
