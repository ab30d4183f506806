"""Download SkyPilot's public v8 catalogs into the catalog directory, atomically.

Layout fetched (the same URLs SkyPilot itself reads): ``<base>/<cloud>/vms.csv`` for each cloud and
``<base>/common/accelerators.csv``. Each file goes to a temporary file beside its target, is checked to be a
v8 catalog (its header), and replaces the old one with ``os.replace``, so a reader never sees half a file.
``meta.json`` records where each file came from, when, and how many rows it has.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from cloudmodal.exception import Error
from cloudmodal.pricing.catalog import META_FILE, REQUIRED_COLUMNS, SCHEMA_VERSION, VMS_FILE, catalog_dir

DEFAULT_BASE_URL = (
    f"https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs/{SCHEMA_VERSION}"
)
DEFAULT_CLOUDS: tuple[str, ...] = ("aws", "gcp", "azure", "lambda", "runpod")
COMMON_FILE = "common/accelerators.csv"

# (file label, bytes so far, total bytes or None) -> None
ProgressFn = Callable[[str, int, int | None], None]


class RefreshError(Error):
    """Some catalog files could not be downloaded; the message lists which and why."""


@dataclass(frozen=True, slots=True)
class Fetched:
    name: str  # "aws/vms.csv"
    url: str
    rows: int
    bytes: int


def _count_rows(data: bytes, name: str, url: str) -> int:
    """Data rows in a CSV; for a ``vms.csv``, check first that it has the v8 columns."""
    text = data.decode("utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise RefreshError(f"{url} returned an empty file for {name}.")
    if name.endswith(VMS_FILE):
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise RefreshError(
                f"{url} is not a SkyPilot v8 catalog (missing column(s) {', '.join(missing)}); "
                "check --url points at a .../catalogs/v8 directory."
            )
    return sum(1 for _ in reader)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(client: httpx.Client, url: str, name: str, progress: ProgressFn | None) -> bytes:
    chunks: list[bytes] = []
    with client.stream("GET", url) as resp:
        if resp.status_code != 200:
            raise RefreshError(f"GET {url} answered HTTP {resp.status_code}.")
        total = resp.headers.get("content-length")
        total_n = int(total) if total and total.isdigit() else None
        got = 0
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
            got += len(chunk)
            if progress is not None:
                progress(name, got, total_n)
    return b"".join(chunks)


def refresh_catalogs(
    directory: str | os.PathLike[str] | None = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    clouds: Iterable[str] = DEFAULT_CLOUDS,
    client: httpx.Client | None = None,
    progress: ProgressFn | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Fetch each cloud's ``vms.csv`` and ``common/accelerators.csv`` into ``directory`` (default: the cache).

    Files that download and validate are installed even when others fail; then :class:`RefreshError`
    names the failures. Returns the new ``meta.json`` content.
    """
    dest = Path(directory).expanduser() if directory is not None else catalog_dir()
    base = base_url.rstrip("/")
    names = [f"{c.strip().lower()}/{VMS_FILE}" for c in clouds if c.strip()] + [COMMON_FILE]
    own_client = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=True)
    fetched: list[Fetched] = []
    errors: list[str] = []
    try:
        for name in names:
            url = f"{base}/{name}"
            try:
                data = _download(http, url, name, progress)
                rows = _count_rows(data, name, url)
            except RefreshError as e:
                errors.append(str(e))
                continue
            except (httpx.HTTPError, UnicodeDecodeError) as e:
                errors.append(f"GET {url} failed: {e}")
                continue
            _write_atomic(dest / name, data)
            fetched.append(Fetched(name, url, rows, len(data)))
    finally:
        if own_client:
            http.close()

    meta = _merge_meta(dest, base, fetched)
    if fetched:
        _write_atomic(dest / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
    if errors:
        done = f" Updated: {', '.join(f.name for f in fetched)}." if fetched else " Nothing was updated."
        raise RefreshError("Could not refresh every catalog file:\n  " + "\n  ".join(errors) + done)
    return meta


def _merge_meta(dest: Path, base: str, fetched: list[Fetched]) -> dict[str, Any]:
    """Previous ``meta.json`` updated with what was fetched now (clouds not fetched keep their entries)."""
    try:
        meta = json.loads((dest / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            meta = {}
    except (FileNotFoundError, ValueError):
        meta = {}
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    meta["schema"] = SCHEMA_VERSION
    meta["base_url"] = base
    if fetched:
        meta["fetched_at"] = now
    clouds = meta.setdefault("clouds", {})
    files = meta.setdefault("files", {})
    for f in fetched:
        entry = {"url": f.url, "fetched_at": now, "rows": f.rows, "bytes": f.bytes}
        files[f.name] = entry
        if f.name.endswith("/" + VMS_FILE):
            clouds[f.name.split("/", 1)[0]] = entry
    return meta
