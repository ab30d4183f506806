"""The cloudmodal package shipped to a node: the very files this process imports, as a deterministic
tarball (:func:`package_tarball`), and cloudmodal's own pip requirements (:func:`cloudmodal_requirements`).

The control plane may be a dev checkout whose version is on no index, so the node gets the ``cloudmodal``
package and the directories mapped into it (``providers``, ``pricing``, ``infra``) as a tarball whose bytes
depend only on the files (no caches, fixed times, owners and modes, sorted): the node caches it by its sha256
(see :mod:`cloudmodal.providers.node_bootstrap`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path


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
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, directory in roots:
            for path in sorted(directory.rglob("*")):
                rel = path.relative_to(directory)
                if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
                    continue
                info = tarfile.TarInfo(f"{name}/{rel.as_posix()}")
                data = path.read_bytes()
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def cloudmodal_requirements() -> list[str]:
    """cloudmodal's own dependencies (no extras), as pip requirement strings."""
    try:
        reqs = importlib.metadata.requires("cloudmodal") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r.replace('"', "").replace("'", "")]
