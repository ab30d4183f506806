"""Load an :class:`OfferTable` from a catalog directory laid out as SkyPilot's v8 catalogs.

Layout: ``<dir>/<cloud>/vms.csv`` (aws, gcp, azure, lambda, runpod, and any other cloud folder whose file has
the same headers; columns are read by header name, since each cloud orders them differently), optionally
``<dir>/meta.json`` written by ``cloudmodal pricing refresh``.

Row rules (each skipped row is counted under its reason in :attr:`CloudSummary.skipped`):

- rows without a GPU are not offers (the table is GPU offers only);
- fractional GPU counts (AWS's partial L4s) are dropped: a request asks for whole GPUs, counted exactly;
- a row with neither price is dropped; a row with only a spot price is a spot-only offer; a price of 0 or
  less is treated as missing;
- GCP prices a GPU row (empty instance type) apart from its host VM: the offer is the GPU price plus the host
  price in the same zone, the host chosen as SkyPilot does: the machine type that bundles those GPUs
  (a2/a3/a4/g2/g4), or else the cheapest N1 type with at least SkyPilot's default vCPUs for that GPU count,
  4 GB per vCPU, and no more than GCP allows to attach.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudmodal.exception import InvalidError, NotFoundError
from cloudmodal.pricing.gpus import catalog_name, lookup
from cloudmodal.pricing.offers import CloudSummary, Offer, OfferTable

CATALOG_DIR_ENV = "CLOUDMODAL_CATALOG_DIR"
SCHEMA_VERSION = "v8"
META_FILE = "meta.json"
VMS_FILE = "vms.csv"
REQUIRED_COLUMNS = (
    "InstanceType",
    "AcceleratorName",
    "AcceleratorCount",
    "vCPUs",
    "MemoryGiB",
    "Price",
    "SpotPrice",
    "Region",
)

# Skip reasons, as shown by `cloudmodal pricing info`.
NO_GPU = "no GPU"
NO_PRICE = "no price"
FRACTIONAL = "fractional GPU count"
BAD_NUMBER = "unreadable number"
TPU = "TPU (not a GPU)"
NO_HOST = "no host VM in the zone for this GPU count"
HOST_ROW = "GCP host VM row (priced into GPU offers)"


class CatalogNotFoundError(NotFoundError):
    """No catalog where one was expected; the message says how to get one."""


class CatalogFormatError(InvalidError):
    """A catalog file is not in SkyPilot's v8 layout."""


def default_catalog_dir() -> Path:
    """The user cache's ``catalogs/v8``: under ``$CLOUDMODAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/cloudmodal``,
    else ``~/.cache/cloudmodal`` (as :func:`cloudmodal.config.cache_dir`)."""
    from cloudmodal.config import cache_base

    return cache_base() / "catalogs" / SCHEMA_VERSION


def catalog_dir() -> Path:
    """Where offers are read from: ``$CLOUDMODAL_CATALOG_DIR``, else the user cache."""
    from cloudmodal.settings import settings

    configured = settings().catalog_dir
    return configured.expanduser() if configured is not None else default_catalog_dir()


def _not_found(directory: Path, why: str) -> CatalogNotFoundError:
    return CatalogNotFoundError(
        f"No GPU price catalog at {directory} ({why}). Run `cloudmodal pricing refresh` to download "
        f"SkyPilot's public catalogs, or set {CATALOG_DIR_ENV} to a directory laid out as <cloud>/vms.csv."
    )


def catalog_files(directory: Path) -> dict[str, Path]:
    """``{cloud: path to vms.csv}`` for every cloud folder of ``directory``, sorted by cloud."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        raise _not_found(directory, "directory does not exist") from None
    except NotADirectoryError:
        raise _not_found(directory, "not a directory") from None
    out: dict[str, Path] = {}
    for e in entries:
        if e.is_dir() and e.name != "common":
            p = Path(e.path) / VMS_FILE
            if p.is_file():
                out[e.name.lower()] = p
    return out


def read_meta(directory: Path) -> dict[str, Any]:
    """``meta.json`` of a refreshed catalog, or ``{}``."""
    try:
        with open(directory / META_FILE, encoding="utf-8") as f:
            meta = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# --- parsing helpers -------------------------------------------------------------------------------------

_MIB = re.compile(r"SizeInMiB'?\"?\s*:\s*([0-9.]+)")
_gpu_cache: dict[tuple[str, str], tuple[str, float]] = {}


def _gpu_memory(info: str) -> float | None:
    """Per-GPU memory in GB from a ``GpuInfo`` cell (a Python-literal dict, or just a name)."""
    m = _MIB.search(info)
    if not m:
        return None
    v = float(m.group(1))
    # RunPod's field holds GB although it is named MiB; no GPU has under 512 MiB.
    return round(v if v < 512 else v / 1024, 1) if v > 0 else None


def _gpu(raw: str, info: str) -> tuple[str, float]:
    """Canonical GPU name and per-GPU GB for a catalog name and ``GpuInfo`` cell (memoized: few distinct)."""
    key = (raw, info)
    got = _gpu_cache.get(key)
    if got is None:
        memory_gb = _gpu_memory(info)
        name = catalog_name(raw, memory_gb)
        if memory_gb is None:
            t = lookup(name)
            memory_gb = float(t.memory_gb) if t is not None else 0.0
        got = _gpu_cache[key] = (name, memory_gb)
    return got


def _price(text: str) -> float | None:
    if not text:
        return None
    v = float(text)
    return v if v > 0 else None  # also drops NaN


def _part_price(text: str) -> float | None:
    """A price that may be 0: GCP's A4 host rows cost nothing beyond their GPU row."""
    if not text:
        return None
    v = float(text)
    return v if v >= 0 else None


def _columns(header: list[str], path: Path) -> dict[str, int]:
    idx = {name.strip(): i for i, name in enumerate(header)}
    missing = [c for c in REQUIRED_COLUMNS if c not in idx]
    if missing:
        raise CatalogFormatError(
            f"{path} is not a SkyPilot v8 catalog file: missing column(s) {', '.join(missing)}. "
            "Run `cloudmodal pricing refresh` to download fresh catalogs."
        )
    return idx


def _bump(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise CatalogFormatError(
                f"{path} is empty. Run `cloudmodal pricing refresh` to download it again."
            )
        return header, list(reader)


# --- generic clouds --------------------------------------------------------------------------------------


def parse_vms(
    cloud: str, header: list[str], rows: Iterable[list[str]], *, source: str, date: str, path: Path
) -> tuple[list[Offer], dict[str, int]]:
    """Offers from one cloud's ``vms.csv`` rows (every cloud but GCP: one row = one offer)."""
    c = _columns(header, path)
    i_it, i_acc, i_cnt = c["InstanceType"], c["AcceleratorName"], c["AcceleratorCount"]
    i_cpu, i_mem, i_p, i_sp, i_reg = c["vCPUs"], c["MemoryGiB"], c["Price"], c["SpotPrice"], c["Region"]
    i_zone, i_info = c.get("AvailabilityZone"), c.get("GpuInfo")
    offers: list[Offer] = []
    skipped: dict[str, int] = {}
    for row in rows:
        raw = row[i_acc]
        if not raw:
            _bump(skipped, NO_GPU)
            continue
        try:
            count = float(row[i_cnt])
            if count != int(count):
                _bump(skipped, FRACTIONAL)
                continue
            od = _price(row[i_p])
            spot = _price(row[i_sp])
            if od is None and spot is None:
                _bump(skipped, NO_PRICE)
                continue
            vcpus = float(row[i_cpu] or 0)
            mem = float(row[i_mem] or 0)
        except (ValueError, IndexError):
            _bump(skipped, BAD_NUMBER)
            continue
        if count <= 0:
            _bump(skipped, NO_GPU)
            continue
        name, gmem = _gpu(raw, row[i_info] if i_info is not None else "")
        offers.append(
            Offer(
                cloud,
                row[i_reg],
                (row[i_zone] or None) if i_zone is not None else None,
                row[i_it],
                name,
                int(count),
                gmem,
                vcpus,
                mem,
                od,
                spot,
                source,
                date,
            )
        )
    return offers, skipped


# --- GCP: GPU rows + host VM rows ------------------------------------------------------------------------

# Machine types that come with their GPUs (SkyPilot's gcp_catalog._ACC_INSTANCE_TYPE_DICTS), keyed by the
# catalog's accelerator name. For these the VM row's price is the host part only; the GPU row adds the rest.
GCP_BUNDLED_HOSTS: dict[str, dict[int, tuple[str, ...]]] = {
    "A100": {
        1: ("a2-highgpu-1g",),
        2: ("a2-highgpu-2g",),
        4: ("a2-highgpu-4g",),
        8: ("a2-highgpu-8g",),
        16: ("a2-megagpu-16g",),
    },
    "A100-80GB": {
        1: ("a2-ultragpu-1g",),
        2: ("a2-ultragpu-2g",),
        4: ("a2-ultragpu-4g",),
        8: ("a2-ultragpu-8g",),
    },
    "L4": {
        1: ("g2-standard-4", "g2-standard-8", "g2-standard-12", "g2-standard-16", "g2-standard-32"),
        2: ("g2-standard-24",),
        4: ("g2-standard-48",),
        8: ("g2-standard-96",),
    },
    "H100": {1: ("a3-highgpu-1g",), 2: ("a3-highgpu-2g",), 4: ("a3-highgpu-4g",), 8: ("a3-highgpu-8g",)},
    "H100-MEGA": {8: ("a3-megagpu-8g",)},
    "H200": {8: ("a3-ultragpu-8g",)},
    "B200": {8: ("a4-highgpu-8g",)},
    "RTXPRO6000": {
        1: ("g4-standard-48",),
        2: ("g4-standard-96",),
        4: ("g4-standard-192",),
        8: ("g4-standard-384",),
    },
}
# Other GPUs attach to an N1 host. Minimum host vCPUs per GPU count (SkyPilot's _NUM_ACC_TO_NUM_CPU) ...
GCP_N1_MIN_CPUS: dict[str, dict[int, int]] = {
    "K80": {1: 4, 2: 8, 4: 16, 8: 32, 16: 64},
    "V100": {1: 8, 2: 16, 4: 32, 8: 64},
    "T4": {1: 4, 2: 8, 4: 48},
    "P100": {1: 8, 2: 16, 4: 32, 8: 64},
    "DEFAULT": {1: 8, 2: 16, 4: 32, 8: 64, 16: 128},
}
# ... with at least this many GB per vCPU, and at most what GCP lets attach: count -> (vCPUs, GB).
GCP_N1_GB_PER_CPU = 4
GCP_N1_MAX: dict[str, dict[int, tuple[int, int]]] = {
    "K80": {1: (8, 52), 2: (16, 104), 4: (32, 208), 8: (64, 208)},
    "V100": {1: (12, 78), 2: (24, 156), 4: (48, 312), 8: (96, 624)},
    "T4": {1: (48, 312), 2: (48, 312), 4: (96, 624)},
    "P4": {1: (24, 156), 2: (48, 312), 4: (96, 624)},
    "P100": {1: (16, 104), 2: (32, 208), 4: (96, 624)},
}
GCP_N1_FAMILIES = ("n1-standard-", "n1-highmem-", "n1-highcpu-")

# (instance type, vCPUs, memory GB, on-demand, spot)
_Host = tuple[str, float, float, float, float | None]


def _gcp_host(
    hosts: list[_Host], acc: str, count: int, cache: dict[tuple[str, int], _Host | None]
) -> _Host | None:
    """The host VM SkyPilot would pair with ``count`` × ``acc`` among one zone's hosts (sorted by price)."""
    k = (acc, count)
    if k in cache:
        return cache[k]
    found: _Host | None = None
    bundled = GCP_BUNDLED_HOSTS.get(acc)
    if bundled is not None:
        types = bundled.get(count, ())
        found = next((h for h in hosts if h[0] in types), None)
    else:
        need = GCP_N1_MIN_CPUS.get(acc, GCP_N1_MIN_CPUS["DEFAULT"]).get(count)
        limit = GCP_N1_MAX.get(acc, {}).get(count)
        if need is not None:
            for h in hosts:
                if not h[0].startswith(GCP_N1_FAMILIES):
                    continue
                if h[1] < need or h[2] < need * GCP_N1_GB_PER_CPU:
                    continue
                if limit is not None and (h[1] > limit[0] or h[2] > limit[1]):
                    continue
                found = h
                break
    cache[k] = found
    return found


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 6)


def parse_gcp_vms(
    header: list[str], rows: Iterable[list[str]], *, source: str, date: str, path: Path
) -> tuple[list[Offer], dict[str, int]]:
    """Offers from GCP's ``vms.csv``: each GPU row composed with its host VM in the same zone."""
    c = _columns(header, path)
    i_it, i_acc, i_cnt = c["InstanceType"], c["AcceleratorName"], c["AcceleratorCount"]
    i_cpu, i_mem, i_p, i_sp, i_reg = c["vCPUs"], c["MemoryGiB"], c["Price"], c["SpotPrice"], c["Region"]
    i_zone, i_info = c.get("AvailabilityZone"), c.get("GpuInfo")
    skipped: dict[str, int] = {}
    hosts: dict[str, list[_Host]] = {}  # zone (or region) -> hosts priced on demand
    gpu_rows: list[list[str]] = []
    bundled_rows: list[list[str]] = []  # rows that name both a machine type and its GPUs
    for row in rows:
        it, acc = row[i_it], row[i_acc]
        if acc:
            if acc.lower().startswith("tpu"):
                _bump(skipped, TPU)
            elif it:
                bundled_rows.append(row)
            else:
                gpu_rows.append(row)
            continue
        if not it:
            _bump(skipped, NO_GPU)
            continue
        _bump(skipped, HOST_ROW)
        try:
            od = _part_price(row[i_p])
            if od is None:
                continue  # SkyPilot picks hosts by on-demand price only
            host: _Host = (it, float(row[i_cpu] or 0), float(row[i_mem] or 0), od, _part_price(row[i_sp]))
        except (ValueError, IndexError):
            continue
        place = (row[i_zone] if i_zone is not None else "") or row[i_reg]
        hosts.setdefault(place, []).append(host)
    for lst in hosts.values():
        lst.sort(key=lambda h: (h[3], h[0]))

    offers, more = parse_vms("gcp", header, bundled_rows, source=source, date=date, path=path)
    for reason, n in more.items():
        skipped[reason] = skipped.get(reason, 0) + n
    gpu_source = f"{source}#gpu+host"
    host_cache: dict[str, dict[tuple[str, int], _Host | None]] = {}
    for row in gpu_rows:
        try:
            count = float(row[i_cnt])
            if count != int(count) or count <= 0:
                _bump(skipped, FRACTIONAL)
                continue
            gpu_od, gpu_spot = _price(row[i_p]), _price(row[i_sp])
        except (ValueError, IndexError):
            _bump(skipped, BAD_NUMBER)
            continue
        region = row[i_reg]
        zone = (row[i_zone] or None) if i_zone is not None else None
        place = zone or region
        acc = row[i_acc]
        paired = _gcp_host(hosts.get(place, []), acc, int(count), host_cache.setdefault(place, {}))
        if paired is None:
            _bump(skipped, NO_HOST)
            continue
        od, spot = _add(gpu_od, paired[3]), _add(gpu_spot, paired[4])
        if od is None and spot is None:
            _bump(skipped, NO_PRICE)
            continue
        name, gmem = _gpu(acc, row[i_info] if i_info is not None else "")
        offers.append(
            Offer(
                "gcp",
                region,
                zone,
                paired[0],
                name,
                int(count),
                gmem,
                paired[1],
                paired[2],
                od,
                spot,
                gpu_source,
                date,
            )
        )
    return offers, skipped


# --- the table -------------------------------------------------------------------------------------------


def _file_date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=UTC).date().isoformat()


def load_cloud(
    cloud: str, path: Path, meta: dict[str, Any] | None = None
) -> tuple[list[Offer], CloudSummary]:
    """Read one cloud's ``vms.csv`` into offers and a summary of what was read."""
    info = ((meta or {}).get("clouds") or {}).get(cloud) or {}
    source = str(info.get("url") or path)
    date = str(info.get("fetched_at") or (meta or {}).get("fetched_at") or _file_date(path))[:10]
    header, rows = _read_csv(path)
    if cloud == "gcp":
        offers, skipped = parse_gcp_vms(header, rows, source=source, date=date, path=path)
    else:
        offers, skipped = parse_vms(cloud, header, rows, source=source, date=date, path=path)
    summary = CloudSummary(
        cloud=cloud,
        path=str(path),
        source=source,
        date=date,
        rows=len(rows),
        offers=len(offers),
        skipped=dict(sorted(skipped.items())),
        gpu_types=tuple(sorted({o.gpu for o in offers})),
    )
    return offers, summary


def read_catalog(directory: str | os.PathLike[str] | None = None) -> OfferTable:
    """Read a catalog directory (default: :func:`catalog_dir`) into a new table. Prefer :func:`load_offer_table`.

    A cloud file that is not in v8 layout is left out with its error in :attr:`CloudSummary.error`; a
    directory with no usable file raises :class:`CatalogNotFoundError`.
    """
    d = Path(directory).expanduser() if directory is not None else catalog_dir()
    files = catalog_files(d)
    if not files:
        raise _not_found(d, "no <cloud>/vms.csv files")
    meta = read_meta(d)
    offers: list[Offer] = []
    summaries: list[CloudSummary] = []
    for cloud, path in files.items():
        try:
            got, summary = load_cloud(cloud, path, meta)
        except CatalogFormatError as e:
            summaries.append(CloudSummary(cloud, str(path), str(path), "", 0, 0, error=str(e)))
            continue
        offers.extend(got)
        summaries.append(summary)
    if not any(s.error is None for s in summaries):
        raise _not_found(d, "; ".join(s.error or "" for s in summaries))
    return OfferTable(offers, summaries)


_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], OfferTable]] = {}


def _signature(d: Path) -> tuple[tuple[str, int, int], ...]:
    sig = []
    for cloud, p in catalog_files(d).items():
        st = p.stat()
        sig.append((cloud, st.st_mtime_ns, st.st_size))
    try:
        st = (d / META_FILE).stat()
        sig.append((META_FILE, st.st_mtime_ns, st.st_size))
    except FileNotFoundError:
        pass
    return tuple(sig)


def load_offer_table(directory: str | os.PathLike[str] | None = None) -> OfferTable:
    """The offer table for a catalog directory (default: :func:`catalog_dir`), cached per process.

    The cache is keyed by the directory and its files' mtimes and sizes, so a refresh is picked up.
    Raises :class:`CatalogNotFoundError` with the command to fix it when there is no catalog.
    """
    d = (Path(directory).expanduser() if directory is not None else catalog_dir()).absolute()
    sig = _signature(d)
    hit = _cache.get(d)
    if hit is not None and hit[0] == sig:
        return hit[1]
    table = read_catalog(d)
    _cache[d] = (sig, table)
    return table


def clear_cache() -> None:
    """Forget loaded tables (tests; a long-lived process that wants to re-read at once)."""
    _cache.clear()
