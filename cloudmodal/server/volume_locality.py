"""Placement's data locality for a launch: where the volumes a function mounts are, and what a worker reads.

A worker reads each mounted volume's current version once, when it starts (its mount writes a working copy
out), so a start reads the version's total bytes from the volume's store. This module turns a function's
volume mounts into :class:`~cloudmodal.placement.DataLocality`:

- where: :func:`~cloudmodal.pricing.egress.store_location` of the volume's store URL, with
  ``CLOUDMODAL_VOLUME_STORE_REGION`` for volumes in the configured ``CLOUDMODAL_VOLUME_STORE`` (a volume keeps
  the store it was created in, so a region set for today's store says nothing about an older one);
- how much: the sum of the file sizes in the head version's manifest, read from the store once per manifest
  (a manifest never changes once written, so the size is cached under its key);
- at what rates: :data:`~cloudmodal.pricing.egress.DEFAULT_RATES`, or ``egress.csv`` beside the price catalog.

Whatever cannot be read (a missing volume, an unreachable store) is a read of unknown size: placement does not
count it and says so. Reading locality never fails a launch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from cloudmodal.placement import DataLocality, DataRead
from cloudmodal.pricing.egress import (
    EGRESS_FILE,
    GIB,
    DataLocation,
    EgressRate,
    custom_endpoint,
    load_rates,
    store_location,
)
from cloudmodal.server.models_volumes import volumes as V

if TYPE_CHECKING:
    from cloudmodal.server.service import ControlPlane
    from cloudmodal.spec import FunctionSpec

log = logging.getLogger("cloudmodal.reconciler")

_SIZES_MAX = 4096  # manifests whose sizes are remembered (a few dozen bytes each)
_sizes: dict[tuple[str, str, str], int] = {}  # (volume location, manifest key, sub path) -> bytes
_sizes_lock = threading.Lock()
_warned: set[str] = set()  # bad egress.csv messages already logged (once each, not every launch)


def volume_data_location(
    store_url: str, configured_store: str, region: str | None, environ: Mapping[str, str]
) -> DataLocation:
    """Where a volume kept in ``store_url`` is; ``region`` (``CLOUD:REGION``) describes ``configured_store``."""
    same = store_url.rstrip("/") == configured_store.rstrip("/")
    return store_location(
        store_url, region if same else None, custom_endpoint=custom_endpoint(store_url, environ)
    )


def egress_rates() -> Mapping[str, EgressRate]:
    """The rates to use: the built-in table, with ``egress.csv`` beside the price catalog applied."""
    from cloudmodal.pricing.catalog import catalog_dir

    return load_rates(Path(catalog_dir()) / EGRESS_FILE)


def _version_bytes(row: Any, sub_path: str = "") -> tuple[int | None, str]:
    """The bytes a mount of the volume's head version reads (the files under ``sub_path``, or all), and why
    not when that cannot be read."""
    from cloudmodal.server.svc_volumes import volume_location
    from cloudmodal.volumes.manifest import FileRecord, Manifest, normalize_path
    from cloudmodal.volumes.store import open_store

    if row.manifest is None:
        return 0, ""  # no committed version: nothing to read
    location = volume_location(row.store_url, row.prefix)
    under = normalize_path(sub_path) if sub_path else ""
    key = (location, row.manifest, under)
    with _sizes_lock:
        got = _sizes.get(key)
    if got is not None:
        return got, ""
    try:
        manifest = Manifest.decode(open_store(location).get(row.manifest))
    except Exception as e:  # any store or format failure: the size is unknown, the launch goes on
        return None, f"its manifest could not be read from {location}: {type(e).__name__}: {e}"
    prefix = under + "/" if under else ""
    total = sum(
        r.size for p, r in manifest.entries.items() if isinstance(r, FileRecord) and p.startswith(prefix)
    )
    with _sizes_lock:
        if len(_sizes) >= _SIZES_MAX:
            _sizes.clear()
        _sizes[key] = total
    return total, ""


def locality_for(cp: ControlPlane, spec: FunctionSpec) -> DataLocality | None:
    """The data a worker of ``spec`` reads at start, where it is; None when the function mounts no volume."""
    if not spec.volumes:
        return None
    # A mount of one directory of a volume (``with_mount_options(sub_path=)``) reads only that directory.
    subs = {path: sub for path, _read_only, sub in getattr(spec, "volume_options", ())}
    mounts = list(dict.fromkeys((ref, subs.get(path, "")) for path, ref in spec.volumes))
    refs = list(dict.fromkeys(ref for ref, _sub in mounts))
    from cloudmodal.server.svc_volumes import Volumes
    from cloudmodal.settings import settings

    s = settings()
    configured = Volumes(cp, s.volume_store).store_url
    with cp.db.read() as conn:
        rows = conn.execute(select(V).where(or_(V.c.name.in_(refs), V.c.id.in_(refs)))).all()
    found = {key: r for r in rows for key in (r.id, r.name) if key}
    reads: list[DataRead] = []
    for ref, sub in mounts:
        row = found.get(ref)
        if row is None:  # created by the worker itself (create_if_missing): empty until it writes
            reads.append(DataRead(ref, DataLocation(None, None, "no such volume yet"), 0.0))
            continue
        where = volume_data_location(row.store_url, configured, s.volume_store_region, os.environ)
        size, why = _version_bytes(row, sub)
        name = (row.name or row.id) + (f":{sub}" if sub else "")
        reads.append(DataRead(name, where, None if size is None else size / GIB, why))
    try:
        rates = egress_rates()
    except Exception as e:  # a bad egress.csv: say so, and price with the built-in table
        if str(e) not in _warned:
            _warned.add(str(e))
            log.warning("egress rates: %s; using the built-in table", e)
        return DataLocality(reads=tuple(reads))
    return DataLocality(reads=tuple(reads), rates=rates)
