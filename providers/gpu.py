"""GPU inventory of this machine: NVML first, ``nvidia-smi`` second, nothing found is ``[]``.

Detection never raises: a host without a driver, without ``nvidia-smi`` or with a broken one has no GPUs.
Device names are normalized with :func:`cloudmodal.pricing.gpus.catalog_name`, so a detected
``NVIDIA H100 80GB HBM3`` matches a user's ``gpu="H100"``.

Dev switch: ``CLOUDMODAL_FAKE_GPUS`` replaces detection with pretend devices, for tests and for developing
GPU code paths on a laptop. ``CLOUDMODAL_FAKE_GPUS="H100:2"`` pretends two H100s exist (indices 0 and 1);
``"H100:2,A10G"`` adds an A10 at index 2; ``"none"`` (or ``"0"``) pretends there are none, even on a GPU
host. Workers placed on fake GPUs get their ``CUDA_VISIBLE_DEVICES`` set as usual but no real device:
never set it in production.

A parent's ``CUDA_VISIBLE_DEVICES`` is honoured: only the devices it lists (by index or UUID) are available.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cloudmodal.pricing.gpus import catalog_name, lookup

FAKE_GPUS_ENV = "CLOUDMODAL_FAKE_GPUS"

NVIDIA_SMI_QUERY = ("--query-gpu=index,name,uuid,memory.total", "--format=csv,noheader,nounits")


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One physical GPU. ``index`` is the NVML / ``nvidia-smi`` index (PCI bus order)."""

    index: int
    name: str  # canonical, e.g. "H100"
    raw_name: str  # as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    uuid: str | None = None
    memory_mib: int | None = None


def canonical_device_name(raw: str, memory_mib: int | None = None) -> str:
    """Catalog name of a device name as the driver spells it ("NVIDIA GeForce RTX 4090" → "RTX-4090")."""
    memory_gb = memory_mib / 1024 if memory_mib else None
    name = catalog_name(raw, memory_gb)
    if lookup(name) is None:
        # Consumer and workstation boards carry a brand the catalog does not use.
        stripped = re.sub(r"\b(NVIDIA|GeForce|Quadro|Tesla)\b", " ", raw, flags=re.IGNORECASE).strip()
        alt = catalog_name(stripped, memory_gb) if stripped else name
        if lookup(alt) is not None:
            return lookup(alt).name
    return name


def _device(index: int, raw_name: str, uuid: str | None, memory_mib: int | None) -> GpuDevice:
    raw_name = raw_name.strip()
    return GpuDevice(index, canonical_device_name(raw_name, memory_mib), raw_name, uuid or None, memory_mib)


def _int_or_none(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


# --- parsers for recorded / live nvidia-smi output (pure) ---------------------------------------------


def parse_query_gpu_csv(text: str) -> list[GpuDevice]:
    """Parse ``nvidia-smi --query-gpu=index,name,uuid,memory.total[,...] --format=csv[,noheader][,nounits]``.

    With a header line (``index, name, uuid, memory.total [MiB], ...``) columns are found by name, so extra
    columns are fine; without one the columns are the order :data:`NVIDIA_SMI_QUERY` asks for. Units
    (``81559 MiB``) are accepted.
    """
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if not rows:
        return []
    columns = {"index": 0, "name": 1, "uuid": 2, "memory.total": 3}
    header = [re.sub(r"\s*\[.*\]$", "", h).strip().lower() for h in rows[0]]
    if "index" in header or "name" in header:
        columns = {key: header.index(key) for key in columns if key in header}
        rows = rows[1:]
    if "index" not in columns or "name" not in columns:
        return []
    devices = []
    for row in rows:
        cell = {key: row[i] if i < len(row) else "" for key, i in columns.items()}
        index = _int_or_none(cell["index"])
        if index is None or not cell["name"]:
            continue
        memory = _int_or_none(cell.get("memory.total", ""))
        devices.append(_device(index, cell["name"], cell.get("uuid"), memory))
    return devices


_L_LINE = re.compile(r"^GPU\s+(\d+):\s*(.+?)\s*\(UUID:\s*([^)]+)\)\s*$")


def parse_nvidia_smi_list(text: str) -> list[GpuDevice]:
    """Parse ``nvidia-smi -L`` (``GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)``); memory is unknown.

    MIG lines (indented ``MIG 1g.10gb Device 0: ...``) are ignored: the parent GPU is what is listed.
    """
    devices = []
    for line in text.splitlines():
        m = _L_LINE.match(line.strip())
        if m:
            devices.append(_device(int(m.group(1)), m.group(2), m.group(3).strip(), None))
    return devices


_TABLE_NAME = re.compile(r"^\|\s*(\d+)\s+(.+?)\s+(On|Off)\s+\|")
_TABLE_MEM = re.compile(r"\|\s*\d+MiB\s*/\s*(\d+)MiB\s*\|")


def parse_nvidia_smi_table(text: str) -> list[GpuDevice]:
    """Parse plain ``nvidia-smi`` output (index, name, total memory; long names may be truncated)."""
    devices = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _TABLE_NAME.match(line)
        if not m:
            continue
        memory = None
        if i + 1 < len(lines):
            mm = _TABLE_MEM.search(lines[i + 1])
            memory = int(mm.group(1)) if mm else None
        raw = m.group(2).rstrip(".").strip()
        devices.append(_device(int(m.group(1)), raw, None, memory))
    return devices


def parse_fake_gpus(spec: str) -> list[GpuDevice]:
    """Parse the ``CLOUDMODAL_FAKE_GPUS`` dev switch: ``"H100:2"``, ``"H100:2,A10G"``, ``"none"``.

    Raises ``InvalidError`` (via the GPU grammar) naming the valid types when a name is unknown.
    """
    from cloudmodal.gpu import parse_gpu_spec

    spec = spec.strip()
    if spec.lower() in ("", "0", "none"):
        return []
    devices: list[GpuDevice] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        tier = parse_gpu_spec(part)
        t = lookup(tier.type)
        memory_mib = t.memory_gb * 1024 if t else None
        for _ in range(tier.count):
            i = len(devices)
            devices.append(GpuDevice(i, tier.type, f"{tier.type} (fake)", f"GPU-fake-{i:04d}", memory_mib))
    return devices


def filter_visible(devices: Sequence[GpuDevice], cuda_visible_devices: str | None) -> list[GpuDevice]:
    """The devices a parent's ``CUDA_VISIBLE_DEVICES`` leaves available (``None``: all of them).

    Entries are indices or (prefixes of) UUIDs, as CUDA accepts; like CUDA, parsing stops at the first entry
    that matches no device, and ``""``/``-1`` hides every device.
    """
    if cuda_visible_devices is None:
        return list(devices)
    chosen: list[GpuDevice] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            match = [d for d in devices if d.index == int(entry)]
        else:
            match = [d for d in devices if d.uuid and d.uuid.lower().startswith(entry.lower())]
        if len(match) != 1:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


# --- live detection (I/O) ---------------------------------------------------------------------------


def _detect_nvml() -> list[GpuDevice] | None:
    """Devices via NVML, or ``None`` when NVML is unavailable (no package, no driver, any error)."""
    try:
        import pynvml  # nvidia-ml-py; imported lazily so `import cloudmodal` stays light
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            devices.append(
                _device(
                    i,
                    name.decode() if isinstance(name, bytes) else str(name),
                    uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    total // (1024 * 1024),
                )
            )
        return devices
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _detect_nvidia_smi(timeout_s: float = 10.0) -> list[GpuDevice]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    try:
        return parse_query_gpu_csv(out.stdout)
    except Exception:
        return []


def detect_gpus(environ: Mapping[str, str] | None = None) -> list[GpuDevice]:
    """The GPUs this process may use: ``CLOUDMODAL_FAKE_GPUS``, else NVML, else ``nvidia-smi``, else ``[]``.

    Filtered by the parent's ``CUDA_VISIBLE_DEVICES``. Never raises except for a malformed
    ``CLOUDMODAL_FAKE_GPUS`` (a developer's typo should be loud).
    """
    from cloudmodal.settings import settings

    env = os.environ if environ is None else environ
    fake = settings(env).fake_gpus
    if fake is not None and fake.strip():
        devices = parse_fake_gpus(fake)
    else:
        nvml = _detect_nvml()
        devices = nvml if nvml is not None else _detect_nvidia_smi()
    return filter_visible(devices, env.get("CUDA_VISIBLE_DEVICES"))


def summarize(devices: Iterable[GpuDevice]) -> str:
    """``"2× H100 (GPU 0, 1), 1× A10 (GPU 2)"``, or ``"no GPUs"``."""
    by_name: dict[str, list[int]] = {}
    for d in devices:
        by_name.setdefault(d.name, []).append(d.index)
    if not by_name:
        return "no GPUs"
    return ", ".join(f"{len(ix)}× {n} (GPU {', '.join(map(str, ix))})" for n, ix in by_name.items())
