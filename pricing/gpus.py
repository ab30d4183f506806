"""GPU names, normalized once.

Every GPU name that enters cloudmodal — from a user's ``gpu=`` argument, a cloud catalog, ``nvidia-smi`` —
passes through this table, so ``A100`` and ``a100-40gb`` are the same class everywhere and ``A10G`` and
``A10`` are one class, as Modal treats them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuType:
    name: str  # canonical, upper case
    memory_gb: int
    aliases: tuple[str, ...] = ()
    max_count: int = 8
    vendor: str = "nvidia"


GPU_TYPES: tuple[GpuType, ...] = (
    GpuType("T4", 16),
    GpuType("T4G", 16, ("T4-G",)),
    GpuType("L4", 24),
    GpuType("A10", 24, ("A10G",), max_count=4),
    GpuType("L40", 48),
    GpuType("L40S", 48),
    GpuType("A40", 48),
    GpuType("A30", 24),
    GpuType("A100-40GB", 40, ("A100", "A100-SXM4-40GB", "A100-PCIE-40GB")),
    GpuType("A100-80GB", 80, ("A100-80GB-SXM", "A100-SXM4-80GB", "A100-PCIE-80GB", "A100-80GB-PCIE")),
    GpuType("A800", 80),
    GpuType(
        "H100", 80, ("H100-SXM", "H100-MEGA", "H100-SXM5", "H100-80GB", "H100-PCIE", "H100-NVLINK", "H100!")
    ),
    GpuType("H100-NVL", 94),
    GpuType("H200", 141, ("H200-SXM",)),
    GpuType("GH200", 96),
    GpuType("B200", 180, ("B200+",)),
    GpuType("B300", 288),
    GpuType("V100", 16, ("V100-16GB",)),
    GpuType("V100-32GB", 32),
    GpuType("P100", 16),
    GpuType("P4", 8),
    GpuType("K80", 12),
    GpuType("M60", 8),
    GpuType("RTX-PRO-6000", 96, ("RTXPRO6000", "RTX-PRO-SERVER-6000", "RTXPRO6000S", "RTX-PRO-6000-SE")),
    GpuType("RTX-PRO-6000-WK", 96, ("RTXPRO6000-WK", "RTXPRO6000WS")),
    GpuType("RTX-PRO-5000", 48, ("RTXPRO5000",)),
    GpuType("RTX-PRO-4500", 32, ("RTXPRO4500",)),
    GpuType("RTX-PRO-4500-SE", 32, ("RTXPRO4500-SE",)),
    GpuType("RTX-PRO-4000", 24, ("RTXPRO4000",)),
    GpuType("RTX-6000-ADA", 48, ("RTX6000-ADA", "RTX6000ADA")),
    GpuType("RTX-6000", 24, ("RTX6000", "QUADRO-RTX-6000")),
    GpuType("RTX-A6000", 48, ("A6000", "RTXA6000")),
    GpuType("RTX-A5000", 24, ("A5000", "RTXA5000")),
    GpuType("RTX-A4500", 20, ("A4500", "RTXA4500")),
    GpuType("RTX-A4000", 16, ("A4000", "RTXA4000")),
    GpuType("RTX-4000-ADA", 20, ("RTX4000-ADA",)),
    GpuType("RTX-2000-ADA", 16, ("RTX2000-ADA",)),
    GpuType("RTX-5090", 32, ("RTX5090",)),
    GpuType("RTX-4090", 24, ("RTX4090",)),
    GpuType("RTX-3090", 24, ("RTX3090",)),
    GpuType("MI300X", 192, vendor="amd"),
    GpuType("RADEON-MI25", 16, ("RADEON MI25",), vendor="amd"),
    GpuType("RADEON-PRO-V520", 8, ("RADEON PRO V520",), vendor="amd"),
    GpuType("GAUDI-HL205", 32, ("GAUDI HL-205", "GAUDI-HL-205"), vendor="habana"),
)

ANY = "ANY"

_BY_KEY: dict[str, GpuType] = {}
for _t in GPU_TYPES:
    for _n in (_t.name, *_t.aliases):
        _BY_KEY[re.sub(r"[\s_]+", "-", _n.upper())] = _t

VALID_NAMES: tuple[str, ...] = tuple(t.name for t in GPU_TYPES)


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().upper())


def lookup(name: str) -> GpuType | None:
    """The GPU type for any accepted spelling of a name, or None."""
    return _BY_KEY.get(_key(name))


def canonical_name(name: str) -> str:
    """Canonical name of a GPU type; raises ``InvalidError`` naming the closest valid names."""
    from cloudmodal.exception import InvalidError

    if _key(name) == ANY:
        return ANY
    t = lookup(name)
    if t is None:
        close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=3, cutoff=0.5)
        close_names = list(dict.fromkeys(_BY_KEY[c].name for c in close))
        hint = f" Did you mean {', '.join(repr(c) for c in close_names)}?" if close_names else ""
        raise InvalidError(
            f"Unknown GPU type {name!r}.{hint} Valid types: {', '.join(VALID_NAMES)}, or 'any'."
        )
    return t.name


def catalog_name(raw: str, memory_gb: float | None = None) -> str:
    """Normalize a GPU name as a cloud catalog or ``nvidia-smi`` spells it.

    Catalogs call both A100 variants "A100" in places and tell them apart by memory; device names such as
    ``NVIDIA H100 80GB HBM3`` are reduced to their model. Unknown names are kept, upper-cased, so offers for
    new GPUs are never silently dropped.
    """
    key = _key(raw)
    key = re.sub(r"^(NVIDIA|TESLA)-", "", key)
    key = re.sub(r"^(NVIDIA|TESLA)-", "", key)
    if key in ("A100", "A100-SXM4", "A100-PCIE") and memory_gb and memory_gb >= 70:
        return "A100-80GB"
    if key in ("V100", "V100-SXM2") and memory_gb and memory_gb >= 30:
        return "V100-32GB"
    t = _BY_KEY.get(key)
    if t is not None:
        return t.name
    # Device names: "H100-80GB-HBM3", "A100-SXM4-40GB", "H100-NVL", "L40S", "A10G"...
    m = re.match(
        r"^(H100-NVL|H100|H200|GH200|B200|B300|A100|A10G?|L40S|L40|L4|T4|A40|A30|V100|P100|P4|K80|M60)\b", key
    )
    if m:
        base = m.group(1)
        if base == "A100":
            return "A100-80GB" if "80GB" in key or (memory_gb and memory_gb >= 70) else "A100-40GB"
        if base == "V100" and ("32GB" in key or (memory_gb and memory_gb >= 30)):
            return "V100-32GB"
        t = _BY_KEY.get(base)
        if t is not None:
            return t.name
    return key
