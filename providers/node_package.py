"""The cloudmodal package shipped to a node: the very files this process imports, as a deterministic
tarball (:func:`package_tarball`), and cloudmodal's own pip requirements (:func:`cloudmodal_requirements`).

The control plane may be a dev checkout whose version is on no index, so the node gets the ``cloudmodal``
package and the directories mapped into it (``providers``, ``pricing``, ``infra``) as a tarball whose bytes
depend only on the files (no caches, fixed times, owners and modes, sorted): the node caches it by its sha256
(see :mod:`cloudmodal.providers.node_bootstrap`).

The user's own packages named by ``Image.add_local_python_source`` go the same way
(:func:`local_sources_tarball`): found on this machine, tarred deterministically, cached on the node by hash
and put on the worker's ``PYTHONPATH`` after cloudmodal.
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any


def package_roots() -> list[tuple[str, Path]]:
    """``(name inside the tarball, local directory)`` for cloudmodal and every subpackage mapped from
    outside its directory (``providers``, ``pricing``, ``infra`` in a checkout; none in a built wheel)."""
    import cloudmodal

    root = Path(cloudmodal.__file__).resolve().parent
    out = [("cloudmodal", root)]
    for sub in ("providers", "pricing", "infra"):
        spec = importlib.util.find_spec(f"cloudmodal.{sub}")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            continue
        d = Path(locations[0]).resolve()
        if not d.is_relative_to(root):
            out.append((f"cloudmodal/{sub}", d))
    return out


@functools.lru_cache(maxsize=1)
def package_tarball() -> tuple[bytes, str]:
    """The local cloudmodal package (:func:`package_roots`) as :func:`build_tarball` makes it, built once
    per process."""
    return build_tarball(package_roots())


def build_tarball(roots: Iterable[tuple[str, Path]]) -> tuple[bytes, str]:
    """A deterministic ``.tar.gz`` of ``(name inside, directory)`` trees — no caches, fixed times, owners
    and modes, sorted — and its sha256: the same files give the same bytes (the node caches by the hash)."""
    files: list[tuple[str, Path]] = []
    for name, directory in roots:
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if _skipped(rel) or not path.is_file():
                continue
            files.append((f"{name}/{rel.as_posix()}", path))
    return _tar(files)


def _skipped(rel: PurePosixPath | Path) -> bool:
    return "__pycache__" in rel.parts or rel.suffix in (".pyc", ".pyo")


def _tar(files: Iterable[tuple[str, Path]]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for arcname, path in sorted(dict(files).items()):
            info = tarfile.TarInfo(arcname)
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


class LocalSourceError(ValueError):
    """A module named by ``Image.add_local_python_source`` was not found on this machine."""


def local_source_modules(image: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """``(module, ignore patterns)`` for every module the image's ``add_local_python_source`` layers name."""
    out = []
    for layer in image.get("layers") or ():
        if layer.get("op") == "add_local_python_source":
            ignore = tuple(p for p in layer.get("ignore") or () if not p.startswith("callable:"))
            out += [(m, ignore) for m in layer.get("modules") or ()]
    return out


def local_sources_tarball(
    modules: Sequence[tuple[str, Sequence[str]]], search_path: Sequence[str]
) -> tuple[bytes, str] | None:
    """The files of ``modules`` (``add_local_python_source`` names, ``pkg`` or ``pkg.sub``) found on
    ``search_path`` (the app's directory, then this process's ``sys.path``) as a deterministic tarball laid
    out as on ``sys.path`` (``pkg/__init__.py``, ``pkg/sub/...``; the parents of a dotted name bring only
    their ``__init__.py``), or None when there are none. Found without importing anything (no user code
    runs here); files matching a module's ``ignore`` patterns (globs on the path inside the package) are
    left out. Raises :class:`LocalSourceError` naming the module that is not found."""
    if not modules:
        return None
    files: dict[str, Path] = {}
    for name, ignore in modules:
        parts = name.split(".")
        locations: list[str] | None = list(search_path)
        spec = None
        prefix: list[str] = []
        for i, part in enumerate(parts):
            spec = importlib.machinery.PathFinder.find_spec(part, locations)
            if spec is None:
                where = ".".join(parts[: i + 1])
                raise LocalSourceError(
                    f"Image.add_local_python_source({name!r}): {where!r} was not found on this machine's Python "
                    f"path ({', '.join(search_path[:4])}...). Run from the directory that holds it, or add its "
                    "parent directory to PYTHONPATH."
                )
            prefix.append(part)
            locations = list(spec.submodule_search_locations or []) or None
            last = i == len(parts) - 1
            if locations is not None and not last:
                init = spec.origin
                if init and init.endswith("__init__.py") and os.path.isfile(init):
                    files["/".join(prefix) + "/__init__.py"] = Path(init)
            elif locations is None and not last:
                raise LocalSourceError(
                    f"Image.add_local_python_source({name!r}): {'.'.join(prefix)!r} is a module, not a package."
                )
        assert spec is not None
        if spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                root = Path(loc)
                for path in sorted(root.rglob("*")):
                    rel = path.relative_to(root)
                    if _skipped(rel) or not path.is_file():
                        continue
                    if any(fnmatch.fnmatch(rel.as_posix(), pat) for pat in ignore):
                        continue
                    files["/".join(prefix) + "/" + rel.as_posix()] = path
        elif spec.origin and os.path.isfile(spec.origin):
            files["/".join(prefix[:-1] + [Path(spec.origin).name])] = Path(spec.origin)
        else:
            raise LocalSourceError(
                f"Image.add_local_python_source({name!r}): it has no source file on this machine (a built-in "
                "or frozen module); leave it out."
            )
    return _tar(files.items())


def cloudmodal_requirements() -> list[str]:
    """cloudmodal's own dependencies (no extras), as pip requirement strings."""
    try:
        reqs = importlib.metadata.requires("cloudmodal") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r.replace('"', "").replace("'", "")]
